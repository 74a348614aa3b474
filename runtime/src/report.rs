//! The HTML report of `fp8forge eval`: one self-contained page (inline CSS and SVG, no scripts, no
//! external resources) with the headline figures, plots of the per-layer, per-expert, per-token and
//! per-tensor figures, and the same numbers as embedded JSON.

use std::cmp::Ordering;
use std::fmt::Write as _;

use crate::metrics::{Comparison, EvalResult, Histogram, LayerStats, TensorError};

/// Width of every plot in pixels.
const PLOT_WIDTH: f64 = 720.0;
/// Left margin of a plot: room for the tick labels and the title of the y axis.
const MARGIN_LEFT: f64 = 72.0;
/// Right margin of a plot.
const MARGIN_RIGHT: f64 = 18.0;
/// Room above a plot for its legend.
const MARGIN_TOP: f64 = 34.0;
/// Room below a plot for the tick labels and the title of the x axis.
const MARGIN_BOTTOM: f64 = 46.0;

/// Colour of the baseline's series.
const BASELINE_COLOR: &str = "#4e79a7";
/// Colour of the evaluated model's series.
const MODEL_COLOR: &str = "#f28e2b";
/// Colour of the KL divergence histogram's bars.
const HISTOGRAM_COLOR: &str = "#7f9fc0";
/// Colour of the mean marker.
const MEAN_COLOR: &str = "#2b8a3e";
/// Colour of the 99th percentile marker.
const P99_COLOR: &str = "#c2255c";
/// Colour of grid lines.
const GRID_COLOR: &str = "#e3e3e3";
/// Colour of axis lines and tick marks.
const AXIS_COLOR: &str = "#555";

/// Values spanning more than this ratio (two decades) get a logarithmic axis.
const LOG_AXIS_MIN_RATIO: f64 = 100.0;
/// Bars of the per-tensor error plot.
const TENSOR_BARS: usize = 50;
/// Rows of the table of the worst tensors.
const TENSOR_TABLE_ROWS: usize = 20;
/// Expert load is drawn as one grouped bar chart per MoE layer up to this many MoE layers...
const DETAILED_MAX_LAYERS: usize = 6;
/// ...and this many experts per layer; beyond, as a per-layer summary and a heat strip.
const DETAILED_MAX_EXPERTS: usize = 64;
/// Colour levels of the heat strip (odd, so that the middle one is "no change").
const HEAT_LEVELS: usize = 9;
/// The heat strip's colour scale saturates at this log2 ratio (1: half and double).
const HEAT_LOG2_LIMIT: f64 = 1.0;

/// Inline style sheet of the page.
const STYLE: &str = "<style>
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#222;max-width:780px;margin:24px auto;padding:0 12px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 6px;border-bottom:1px solid #ddd;padding-bottom:3px}
p.sub{color:#555;margin:0 0 14px;word-break:break-all}p.note{color:#555;font-style:italic}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.headline td:first-child{color:#444;white-space:nowrap}table.headline td:last-child{word-break:break-all}
table.worst{font-size:12.5px}table.worst td.name{word-break:break-all}
svg{display:block;max-width:100%;height:auto;margin:6px 0}
svg text{font:12px system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;fill:#333}
svg text.axis{font-size:12.5px;fill:#111}svg text.panel{font-weight:600}
</style>
";

/// Renders the result of `fp8forge eval` as one self-contained HTML page: a headline table, inline
/// SVG plots (per-layer hidden-state error and routing agreement, expert load, the distribution of
/// the KL divergence, per-tensor weight error), the worst tensors, and `r` itself as JSON in a
/// `<script type="application/json" id="fp8forge-result">` element.
///
/// Without a baseline only the model's own figures and its expert load are shown. Non-finite
/// values are shown as "n/a" and left out of the plots.
pub fn render_html(r: &EvalResult) -> String {
    let mut page = String::with_capacity(128 * 1024);
    page.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    let _ = writeln!(page, "<title>fp8forge eval: {}</title>", escape_html(&r.model));
    page.push_str(STYLE);
    page.push_str("</head>\n<body>\n<h1>fp8forge eval</h1>\n");
    let _ = match &r.baseline {
        Some(c) => writeln!(
            page,
            "<p class=\"sub\">{} compared with {}</p>",
            escape_html(&r.model),
            escape_html(&c.baseline_model)
        ),
        None => writeln!(page, "<p class=\"sub\">{}</p>", escape_html(&r.model)),
    };
    page.push_str(&headline_table(r));

    match &r.baseline {
        Some(c) => comparison_sections(&mut page, r, c),
        None => page.push_str(
            "<p class=\"note\">No baseline was given, so there is no comparison: no KL divergence, \
             agreement, hidden-state or weight error plots.</p>\n",
        ),
    }

    page.push_str("<h2>Expert load</h2>\n");
    match expert_load_plot(&r.layers) {
        Some(svg) => page.push_str(&svg),
        None => page.push_str("<p class=\"note\">No MoE layer with routing figures.</p>\n"),
    }

    page.push_str(&embedded_json(r));
    page.push_str("</body>\n</html>\n");
    page
}

/// Appends the sections that need a baseline: hidden-state error, routing agreement, KL divergence
/// and weight error.
fn comparison_sections(page: &mut String, r: &EvalResult, c: &Comparison) {
    page.push_str("<h2>Hidden-state error per layer</h2>\n");
    page.push_str(
        "<p>Relative error <code>‖h − h<sub>baseline</sub>‖ / ‖h<sub>baseline</sub>‖</code> of the hidden \
         states leaving each decoder layer.</p>\n",
    );
    match hidden_error_plot(&r.layers) {
        Some(svg) => page.push_str(&svg),
        None => page.push_str("<p class=\"note\">No per-layer hidden-state errors were recorded.</p>\n"),
    }

    page.push_str("<h2>Routing agreement per layer</h2>\n");
    page.push_str("<p>Share of tokens whose selected expert set is the same as the baseline's.</p>\n");
    match routing_agreement_plot(&r.layers) {
        Some(svg) => page.push_str(&svg),
        None => page.push_str("<p class=\"note\">No per-layer routing agreement was recorded.</p>\n"),
    }

    page.push_str("<h2>KL divergence per token</h2>\n");
    match kld_histogram_plot(c) {
        Some(svg) => {
            page.push_str(&svg);
            let _ = writeln!(
                page,
                "<p>KL(P<sub>baseline</sub> ‖ P<sub>model</sub>) in nats over log-spaced bins; values below the \
                 first bin count in it, values above the last in the last. Largest: {}.</p>",
                fmt_sig(c.kld_max, 3)
            );
        }
        None => page.push_str("<p class=\"note\">No KL divergence histogram was recorded.</p>\n"),
    }

    page.push_str("<h2>Weight error per tensor</h2>\n");
    let sorted = sorted_tensor_errors(&c.tensor_errors);
    match tensor_error_plot(&sorted) {
        Some(svg) => {
            let shown = sorted.len().min(TENSOR_BARS);
            let _ = writeln!(
                page,
                "<p>Relative RMS error <code>‖w − w<sub>ref</sub>‖ / ‖w<sub>ref</sub>‖</code>, largest first: \
                 the {} largest of {} tensors that differ (hover a bar for its name).</p>",
                fmt_count(shown),
                fmt_count(sorted.len())
            );
            page.push_str(&svg);
            page.push_str(&worst_tensor_table(&sorted));
        }
        None => page.push_str("<p class=\"note\">No per-tensor weight errors were recorded.</p>\n"),
    }
}

// ---------------------------------------------------------------------------------------------
// Tables and text
// ---------------------------------------------------------------------------------------------

/// The table of the headline figures.
fn headline_table(r: &EvalResult) -> String {
    let mut rows: Vec<(&str, String)> = vec![("Model", escape_html(&r.model))];
    if let Some(c) = &r.baseline {
        rows.push(("Baseline", escape_html(&c.baseline_model)));
    }
    rows.push(("Model type", escape_html(&r.model_type)));
    rows.push(("Weights", escape_html(&r.weights)));
    rows.push(("Activation quantization", escape_html(&r.act_quant.to_string())));
    rows.push(("Context", format!("{} tokens × {} windows", fmt_count(r.ctx), fmt_count(r.windows))));
    rows.push(("Tokens scored", format!("{} of {}", fmt_count(r.tokens_scored), fmt_count(r.tokens))));
    rows.push(("Perplexity (model)", fmt_plus_minus(r.perplexity, r.perplexity_stderr)));
    if let Some(c) = &r.baseline {
        rows.push(("Perplexity (baseline)", fmt_plus_minus(c.baseline_perplexity, c.baseline_perplexity_stderr)));
        rows.push((
            "Perplexity change",
            format!("<b>{}</b>", fmt_relative_change(r.perplexity, c.baseline_perplexity)),
        ));
        rows.push((
            "Mean NLL model / baseline",
            format!("{} / {} nats", fmt_fixed(r.nll_mean, 4), fmt_fixed(c.baseline_nll_mean, 4)),
        ));
        rows.push((
            "KL divergence mean / p99 / max",
            format!("{} / {} / {} nats", fmt_sig(c.kld_mean, 3), fmt_sig(c.kld_p99, 3), fmt_sig(c.kld_max, 3)),
        ));
        rows.push(("Top-1 agreement", fmt_percent(c.top1_agreement)));
        rows.push(("Routing agreement", fmt_percent(c.routing_agreement)));
    } else {
        rows.push(("Mean NLL", format!("{} nats", fmt_fixed(r.nll_mean, 4))));
    }
    rows.push(("Streamed", if r.streamed { "yes" } else { "no" }.to_string()));
    rows.push(("Time", format!("{} s", fmt_fixed(r.seconds, 1))));
    rows.push(("Throughput", format!("{} tokens/s", fmt_fixed(r.tokens_per_second, 1))));

    let mut html = String::from("<table class=\"headline\">\n");
    for (label, value) in rows {
        let _ = writeln!(html, "<tr><td>{label}</td><td>{value}</td></tr>");
    }
    html.push_str("</table>\n");
    html
}

/// The table of the tensors with the largest relative error (`sorted` is largest first).
fn worst_tensor_table(sorted: &[&TensorError]) -> String {
    let mut html = String::from(
        "<table class=\"worst\">\n<tr><th>#</th><th>tensor</th><th>shape</th><th>rel. RMS</th><th>max abs</th>\
         <th>SNR (dB)</th></tr>\n",
    );
    for (rank, t) in sorted.iter().take(TENSOR_TABLE_ROWS).enumerate() {
        let snr = match t.snr_db {
            Some(db) => fmt_fixed(db, 1),
            None => "equal".to_string(),
        };
        let _ = writeln!(
            html,
            "<tr><td class=\"num\">{}</td><td class=\"name\">{}</td><td>{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            rank + 1,
            escape_html(&t.name),
            fmt_shape(&t.shape),
            fmt_sig(t.rel_rms, 4),
            fmt_sig(t.max_abs, 3),
            snr
        );
    }
    html.push_str("</table>\n");
    html
}

/// `r` as JSON in a `<script type="application/json">` element. Every `<` is written as `\u003c`
/// (the same string to a JSON parser), so no `</script>` in a name can end the element early.
fn embedded_json(r: &EvalResult) -> String {
    let json = serde_json::to_string(r).unwrap_or_else(|_| "null".to_string());
    format!("<script type=\"application/json\" id=\"fp8forge-result\">{}</script>\n", json.replace('<', "\\u003c"))
}

/// Escapes `&`, `<`, `>`, `"` and `'` for HTML text and attribute values.
fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(ch),
        }
    }
    out
}

/// `x` with `decimals` decimals, or "n/a" when it is not finite.
fn fmt_fixed(x: f64, decimals: usize) -> String {
    if x.is_finite() { format!("{:.*}", decimals, x + 0.0) } else { "n/a".to_string() }
}

/// `x` with `sig` significant digits: fixed notation from 0.001 to 10⁴, scientific outside.
fn fmt_sig(x: f64, sig: usize) -> String {
    if !x.is_finite() {
        return "n/a".to_string();
    }
    if x == 0.0 {
        return "0".to_string();
    }
    let sig = sig.max(1);
    let magnitude = x.abs().log10().floor();
    if (-3.0..4.0).contains(&magnitude) {
        let decimals = (sig as f64 - 1.0 - magnitude).max(0.0) as usize;
        format!("{:.*}", decimals, x)
    } else {
        format!("{:.*e}", sig - 1, x)
    }
}

/// `value ± stderr` with four decimals.
fn fmt_plus_minus(value: f64, stderr: f64) -> String {
    format!("{} ± {}", fmt_fixed(value, 4), fmt_fixed(stderr, 4))
}

/// The change of `value` relative to `reference` in percent, with its sign.
fn fmt_relative_change(value: f64, reference: f64) -> String {
    let change = (value / reference - 1.0) * 100.0;
    if change.is_finite() && reference != 0.0 { format!("{:+.2}%", change + 0.0) } else { "n/a".to_string() }
}

/// A share in `[0, 1]` as a percentage with two decimals.
fn fmt_percent(share: f64) -> String {
    if share.is_finite() { format!("{:.2}%", share * 100.0) } else { "n/a".to_string() }
}

/// A count with thousands separators.
fn fmt_count(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// A tensor shape as `rows×cols`.
fn fmt_shape(shape: &[usize]) -> String {
    shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("×")
}

// ---------------------------------------------------------------------------------------------
// Plots
// ---------------------------------------------------------------------------------------------

/// Per-layer relative error of the hidden states, or `None` when no layer has one.
fn hidden_error_plot(layers: &[LayerStats]) -> Option<String> {
    let points: Vec<Point> = layers
        .iter()
        .filter_map(|l| {
            let err = l.hidden_rel_err.filter(|e| e.is_finite())?;
            Some(Point { x: l.layer as f64, y: err, tip: format!("layer {}: {}", l.layer, fmt_sig(err, 3)) })
        })
        .collect();
    let series = [Series { label: "model vs baseline".to_string(), color: MODEL_COLOR, points }];
    line_plot(&series, "layer", "relative error", "Relative error of the hidden states per layer")
}

/// Per-layer routing agreement in percent, or `None` when no layer has one.
fn routing_agreement_plot(layers: &[LayerStats]) -> Option<String> {
    let points: Vec<Point> = layers
        .iter()
        .filter_map(|l| {
            let share = l.routing_agreement.filter(|a| a.is_finite())?;
            Some(Point {
                x: l.layer as f64,
                y: share * 100.0,
                tip: format!("layer {}: {}", l.layer, fmt_percent(share)),
            })
        })
        .collect();
    let series = [Series { label: "routing agreement".to_string(), color: MODEL_COLOR, points }];
    line_plot(&series, "layer", "agreement (%)", "Routing agreement per MoE layer")
}

/// A point of a line plot with its tooltip.
struct Point {
    x: f64,
    y: f64,
    tip: String,
}

/// A named series of a line plot.
struct Series {
    label: String,
    color: &'static str,
    points: Vec<Point>,
}

/// A line plot with points of `series` over a layer-index x axis, or `None` when no series has a
/// point. The y axis is logarithmic when the values span more than two decades.
fn line_plot(series: &[Series], x_title: &str, y_title: &str, label: &str) -> Option<String> {
    let xs: Vec<f64> = series.iter().flat_map(|s| s.points.iter().map(|p| p.x)).collect();
    let ys: Vec<f64> = series.iter().flat_map(|s| s.points.iter().map(|p| p.y)).collect();
    let (x_min, x_max) = finite_min_max(&xs)?;
    let top = if series.len() > 1 { MARGIN_TOP } else { 14.0 };
    let frame = Frame { left: MARGIN_LEFT, top, width: PLOT_WIDTH - MARGIN_LEFT - MARGIN_RIGHT, height: 240.0 };
    let x_axis = index_axis(x_min - 0.5, x_max + 0.5, 12);
    let y_axis = value_axis(&ys, false);
    let mut svg = Svg::new(PLOT_WIDTH, frame.bottom() + MARGIN_BOTTOM, label);
    draw_axes(&mut svg, &frame, &x_axis, &y_axis, x_title, y_title);
    draw_line_series(&mut svg, &frame, &x_axis, &y_axis, series);
    if series.len() > 1 {
        let items: Vec<LegendItem> = series
            .iter()
            .map(|s| LegendItem { color: s.color, label: s.label.clone(), key: LegendKey::Line })
            .collect();
        draw_legend(&mut svg, frame.left, 16.0, &items);
    }
    Some(svg.finish())
}

/// Draws each series as a polyline through its points with a marker (and tooltip) per point.
fn draw_line_series(svg: &mut Svg, frame: &Frame, x_axis: &Axis, y_axis: &Axis, series: &[Series]) {
    for s in series {
        let coords: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|p| p.x.is_finite() && p.y.is_finite())
            .map(|p| (frame.x(x_axis, p.x), frame.y(y_axis, p.y)))
            .collect();
        if coords.len() > 1 {
            svg.polyline(&coords, s.color, 2.0);
        }
        let radius = if coords.len() > 80 { 2.2 } else { 3.2 };
        for (p, (x, y)) in s.points.iter().filter(|p| p.x.is_finite() && p.y.is_finite()).zip(&coords) {
            svg.circle(*x, *y, radius, s.color, Some(&p.tip));
        }
    }
}

/// The MoE layers with routing figures, in order.
fn moe_layers(layers: &[LayerStats]) -> Vec<&LayerStats> {
    layers.iter().filter(|l| l.moe && !l.expert_load.is_empty()).collect()
}

/// The expert load plot: grouped bars per expert and layer for a few small layers, a per-layer
/// imbalance summary and a heat strip otherwise. `None` without MoE layers.
fn expert_load_plot(layers: &[LayerStats]) -> Option<String> {
    let moe = moe_layers(layers);
    if moe.is_empty() {
        return None;
    }
    let experts = moe.iter().map(|l| expert_count(l)).max().unwrap_or(0);
    if moe.len() <= DETAILED_MAX_LAYERS && experts <= DETAILED_MAX_EXPERTS {
        Some(expert_load_bars(&moe, experts))
    } else {
        Some(expert_load_summary(&moe, experts))
    }
}

/// Experts of a layer: the longer of the model's and the baseline's load vectors.
fn expert_count(layer: &LayerStats) -> usize {
    layer.expert_load.len().max(layer.baseline_expert_load.as_ref().map_or(0, Vec::len))
}

/// One grouped bar chart (baseline and model load per expert) per MoE layer, stacked in one SVG.
fn expert_load_bars(moe: &[&LayerStats], experts: usize) -> String {
    const PANEL_HEIGHT: f64 = 130.0;
    const PANEL_GAP: f64 = 74.0;
    let has_baseline = moe.iter().any(|l| l.baseline_expert_load.is_some());
    let height = MARGIN_TOP + 20.0 + moe.len() as f64 * (PANEL_HEIGHT + PANEL_GAP) - PANEL_GAP + MARGIN_BOTTOM;
    let mut svg = Svg::new(PLOT_WIDTH, height, "Tokens routed to each expert per MoE layer");
    let mut legend = vec![LegendItem { color: MODEL_COLOR, label: "model".to_string(), key: LegendKey::Bar }];
    if has_baseline {
        legend.insert(0, LegendItem { color: BASELINE_COLOR, label: "baseline".to_string(), key: LegendKey::Bar });
    }
    draw_legend(&mut svg, MARGIN_LEFT, 16.0, &legend);

    let x_axis = index_axis(-0.5, experts as f64 - 0.5, 16);
    let band = (PLOT_WIDTH - MARGIN_LEFT - MARGIN_RIGHT) / experts.max(1) as f64;
    for (i, layer) in moe.iter().enumerate() {
        let frame = Frame {
            left: MARGIN_LEFT,
            top: MARGIN_TOP + 20.0 + i as f64 * (PANEL_HEIGHT + PANEL_GAP),
            width: PLOT_WIDTH - MARGIN_LEFT - MARGIN_RIGHT,
            height: PANEL_HEIGHT,
        };
        let baseline = layer.baseline_expert_load.as_deref().unwrap_or(&[]);
        let max_load = layer.expert_load.iter().chain(baseline).copied().max().unwrap_or(0);
        let y_axis = nice_linear_axis(0.0, max_load as f64, 4);
        let title = match layer.routing_agreement.filter(|a| a.is_finite()) {
            Some(a) => format!("layer {} (routing agreement {})", layer.layer, fmt_percent(a)),
            None => format!("layer {}", layer.layer),
        };
        svg.text(frame.left, frame.top - 8.0, Anchor::Start, "panel", &title);
        draw_axes(&mut svg, &frame, &x_axis, &y_axis, "expert", "tokens");

        let series: Vec<(&[u64], &str, &str)> = if has_baseline {
            vec![(baseline, BASELINE_COLOR, "baseline"), (&layer.expert_load, MODEL_COLOR, "model")]
        } else {
            vec![(&layer.expert_load, MODEL_COLOR, "model")]
        };
        let bar_width = band * 0.8 / series.len() as f64;
        for (k, (loads, color, name)) in series.iter().enumerate() {
            for (e, &load) in loads.iter().enumerate() {
                if load == 0 {
                    continue;
                }
                let x = frame.x(&x_axis, e as f64) - band * 0.4 + k as f64 * bar_width;
                let y = frame.y(&y_axis, load as f64);
                let tip = format!("layer {}, expert {e}, {name}: {} tokens", layer.layer, fmt_count(load as usize));
                svg.rect(x, y, bar_width, frame.bottom() - y, color, Some(&tip));
            }
        }
    }
    svg.finish()
}

/// Many layers or experts: the per-layer load imbalance (largest load over mean load) of model and
/// baseline as lines, then a heat strip of the model's load relative to the baseline's (or to its
/// mean without a baseline), one row per MoE layer and one column per expert.
fn expert_load_summary(moe: &[&LayerStats], experts: usize) -> String {
    let has_baseline = moe.iter().any(|l| l.baseline_expert_load.is_some());
    let plot_width = PLOT_WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
    let lines = Frame { left: MARGIN_LEFT, top: MARGIN_TOP, width: plot_width, height: 170.0 };
    let row_height = (360.0 / moe.len() as f64).clamp(3.0, 16.0);
    let strip = Frame {
        left: MARGIN_LEFT,
        top: lines.bottom() + 96.0,
        width: plot_width,
        height: row_height * moe.len() as f64,
    };
    let mut svg = Svg::new(PLOT_WIDTH, strip.bottom() + MARGIN_BOTTOM, "Expert load per MoE layer");

    let imbalance = |loads: &[u64]| -> Option<f64> {
        let max = loads.iter().copied().max()? as f64;
        let mean = loads.iter().map(|&n| n as f64).sum::<f64>() / loads.len() as f64;
        (mean > 0.0).then_some(max / mean)
    };
    let point = |layer: usize, value: Option<f64>, who: &str| {
        value.map(|v| Point { x: layer as f64, y: v, tip: format!("layer {layer}, {who}: max/mean load {v:.2}") })
    };
    let mut series = Vec::new();
    if has_baseline {
        let points = moe
            .iter()
            .filter_map(|l| point(l.layer, l.baseline_expert_load.as_deref().and_then(imbalance), "baseline"))
            .collect();
        series.push(Series { label: "baseline".to_string(), color: BASELINE_COLOR, points });
    }
    let points = moe.iter().filter_map(|l| point(l.layer, imbalance(&l.expert_load), "model")).collect();
    series.push(Series { label: "model".to_string(), color: MODEL_COLOR, points });

    let xs: Vec<f64> = moe.iter().map(|l| l.layer as f64).collect();
    let (x_min, x_max) = finite_min_max(&xs).unwrap_or((0.0, 0.0));
    let x_axis = index_axis(x_min - 0.5, x_max + 0.5, 12);
    let ys: Vec<f64> = series.iter().flat_map(|s| s.points.iter().map(|p| p.y)).collect();
    let y_axis = value_axis(&ys, false);
    let legend: Vec<LegendItem> =
        series.iter().map(|s| LegendItem { color: s.color, label: s.label.clone(), key: LegendKey::Line }).collect();
    draw_legend(&mut svg, lines.left, 16.0, &legend);
    draw_axes(&mut svg, &lines, &x_axis, &y_axis, "layer", "max / mean load");
    draw_line_series(&mut svg, &lines, &x_axis, &y_axis, &series);

    let caption =
        if has_baseline { "load of each expert, model / baseline" } else { "load of each expert / mean load" };
    svg.text(strip.left, strip.top - 40.0, Anchor::Start, "panel", caption);
    draw_color_scale(&mut svg, strip.right() - 240.0, strip.top - 52.0, 240.0);
    let rows: Vec<Vec<f64>> = moe.iter().map(|l| load_log2_ratios(l)).collect();
    draw_heat_strip(&mut svg, &strip, &rows, experts);
    let labels: Vec<usize> = moe.iter().map(|l| l.layer).collect();
    draw_row_labels(&mut svg, &strip, &labels, "layer");
    let expert_axis = index_axis(-0.5, experts as f64 - 0.5, 16);
    draw_x_axis(&mut svg, &strip, &expert_axis, "expert");
    svg.finish()
}

/// Per expert, log2 of the model's load over the baseline's, or over the mean load without a
/// baseline. Zero against non-zero saturates the colour scale; zero against zero is no change.
fn load_log2_ratios(layer: &LayerStats) -> Vec<f64> {
    let model = &layer.expert_load;
    let reference: Vec<f64> = match &layer.baseline_expert_load {
        Some(base) => base.iter().map(|&n| n as f64).collect(),
        None => {
            let mean = model.iter().map(|&n| n as f64).sum::<f64>() / model.len().max(1) as f64;
            vec![mean; model.len()]
        }
    };
    model
        .iter()
        .zip(reference)
        .map(|(&m, r)| {
            let m = m as f64;
            if m == 0.0 && r == 0.0 {
                0.0
            } else if r == 0.0 {
                HEAT_LOG2_LIMIT
            } else if m == 0.0 {
                -HEAT_LOG2_LIMIT
            } else {
                (m / r).log2()
            }
        })
        .collect()
}

/// The colour level (0..HEAT_LEVELS) of a log2 ratio, `None` when it is not finite.
fn heat_level(log2_ratio: f64) -> Option<usize> {
    if !log2_ratio.is_finite() {
        return None;
    }
    let t = (log2_ratio / HEAT_LOG2_LIMIT).clamp(-1.0, 1.0);
    Some((((t + 1.0) / 2.0) * (HEAT_LEVELS - 1) as f64).round() as usize)
}

/// The colour of a heat level: blue (less load) through light grey (no change) to red (more load).
fn heat_color(level: usize) -> String {
    const LOW: (f64, f64, f64) = (33.0, 102.0, 172.0);
    const MID: (f64, f64, f64) = (242.0, 242.0, 242.0);
    const HIGH: (f64, f64, f64) = (178.0, 24.0, 43.0);
    let t = level as f64 / (HEAT_LEVELS - 1) as f64 * 2.0 - 1.0;
    let (from, to, s) = if t < 0.0 { (MID, LOW, -t) } else { (MID, HIGH, t) };
    let mix = |a: f64, b: f64| (a + (b - a) * s).round().clamp(0.0, 255.0) as u8;
    format!("#{:02x}{:02x}{:02x}", mix(from.0, to.0), mix(from.1, to.1), mix(from.2, to.2))
}

/// Draws `rows` (one per MoE layer, one value per expert) as coloured cells filling `frame`: one
/// path per colour level, runs of equal cells merged, in cell units scaled by a transform, which
/// keeps 256 experts × 61 layers to some hundred kilobytes.
fn draw_heat_strip(svg: &mut Svg, frame: &Frame, rows: &[Vec<f64>], experts: usize) {
    let mut paths = vec![String::new(); HEAT_LEVELS];
    for (r, row) in rows.iter().enumerate() {
        let mut e = 0;
        while e < row.len() {
            let level = heat_level(row[e]);
            let mut run = 1;
            while e + run < row.len() && heat_level(row[e + run]) == level {
                run += 1;
            }
            if let Some(level) = level {
                let _ = write!(paths[level], "M{e} {r}h{run}v1h-{run}z");
            }
            e += run;
        }
    }
    svg.rect(frame.left, frame.top, frame.width, frame.height, "#bbb", None);
    let _ = write!(
        svg.out,
        "<g transform=\"translate({} {}) scale({} {})\">",
        coord(frame.left),
        coord(frame.top),
        coord_fine(frame.width / experts.max(1) as f64),
        coord_fine(frame.height / rows.len().max(1) as f64)
    );
    for (level, d) in paths.iter().enumerate() {
        if !d.is_empty() {
            let _ = write!(svg.out, "<path fill=\"{}\" d=\"{d}\"/>", heat_color(level));
        }
    }
    svg.out.push_str("</g>\n");
}

/// The heat strip's colour scale: one swatch per level, labelled ½×, 1× and 2×.
fn draw_color_scale(svg: &mut Svg, left: f64, top: f64, width: f64) {
    let swatch = width / HEAT_LEVELS as f64;
    for level in 0..HEAT_LEVELS {
        svg.rect(left + level as f64 * swatch, top, swatch, 12.0, &heat_color(level), None);
    }
    let limit = 2f64.powf(HEAT_LOG2_LIMIT);
    svg.text(left, top + 26.0, Anchor::Start, "", &format!("≤ {}×", 1.0 / limit));
    svg.text(left + width / 2.0, top + 26.0, Anchor::Middle, "", "1×");
    svg.text(left + width, top + 26.0, Anchor::End, "", &format!("≥ {limit}×"));
}

/// Labels the rows of a heat strip (top to bottom) with about ten of their layer numbers.
fn draw_row_labels(svg: &mut Svg, frame: &Frame, labels: &[usize], title: &str) {
    let row_height = frame.height / labels.len().max(1) as f64;
    let every = labels.len().div_ceil(10).max(1);
    for (r, label) in labels.iter().enumerate().step_by(every) {
        let y = frame.top + (r as f64 + 0.5) * row_height;
        svg.line(frame.left - 4.0, y, frame.left, y, AXIS_COLOR, "");
        svg.text(frame.left - 7.0, y + 4.0, Anchor::End, "", &label.to_string());
    }
    svg.vertical_text(frame.left - 50.0, frame.top + frame.height / 2.0, "axis", title);
}

/// The distribution of the per-token KL divergence, with markers at the mean and the 99th
/// percentile; `None` when the histogram is empty, malformed or counts nothing.
fn kld_histogram_plot(c: &Comparison) -> Option<String> {
    let h = &c.kld_histogram;
    let edges = positive_bin_edges(h)?;
    if h.counts.iter().all(|&n| n == 0) {
        return None;
    }
    let frame =
        Frame { left: MARGIN_LEFT, top: MARGIN_TOP, width: PLOT_WIDTH - MARGIN_LEFT - MARGIN_RIGHT, height: 240.0 };
    let x_axis = log_axis(edges[0], edges[edges.len() - 1]);
    let counts: Vec<f64> = h.counts.iter().filter(|&&n| n > 0).map(|&n| n as f64).collect();
    let y_axis = value_axis(&counts, true);
    let mut svg = Svg::new(PLOT_WIDTH, frame.bottom() + MARGIN_BOTTOM, "Distribution of the per-token KL divergence");
    draw_axes(&mut svg, &frame, &x_axis, &y_axis, "KL divergence per token (nats)", "tokens");
    for (i, &count) in h.counts.iter().enumerate() {
        if count == 0 {
            continue;
        }
        let x0 = frame.x(&x_axis, edges[i]);
        let x1 = frame.x(&x_axis, edges[i + 1]);
        let y = frame.y(&y_axis, count as f64);
        let gap = if x1 - x0 > 3.0 { 1.0 } else { 0.0 };
        let tip = format!(
            "[{}, {}): {} tokens",
            fmt_sig(h.edges[i].max(0.0), 3),
            fmt_sig(h.edges[i + 1], 3),
            fmt_count(count as usize)
        );
        svg.rect(x0 + gap / 2.0, y, (x1 - x0 - gap).max(0.5), frame.bottom() - y, HISTOGRAM_COLOR, Some(&tip));
    }
    let mut legend =
        vec![LegendItem { color: HISTOGRAM_COLOR, label: "tokens per bin".to_string(), key: LegendKey::Bar }];
    for (value, color, name) in [(c.kld_mean, MEAN_COLOR, "mean"), (c.kld_p99, P99_COLOR, "p99")] {
        legend.push(LegendItem { color, label: format!("{name} = {}", fmt_sig(value, 3)), key: LegendKey::Dash });
        if value.is_finite() && value >= x_axis.lo && value <= x_axis.hi {
            let x = frame.x(&x_axis, value);
            svg.line(x, frame.top, x, frame.bottom(), color, " stroke-width=\"2\" stroke-dasharray=\"6 4\"");
        }
    }
    draw_legend(&mut svg, frame.left, 16.0, &legend);
    Some(svg.finish())
}

/// The histogram's edges, all positive, or `None` when they are not `counts.len() + 1` finite,
/// increasing values. A first edge at or below zero is replaced by one continuing the log spacing.
fn positive_bin_edges(h: &Histogram) -> Option<Vec<f64>> {
    if h.counts.is_empty() || h.edges.len() != h.counts.len() + 1 {
        return None;
    }
    let mut edges = h.edges.clone();
    if edges.iter().any(|e| !e.is_finite()) || edges.windows(2).any(|w| w[0] >= w[1]) || edges[1] <= 0.0 {
        return None;
    }
    if edges[0] <= 0.0 {
        let ratio = match edges.get(2) {
            Some(&next) => next / edges[1],
            None => 10.0,
        };
        edges[0] = edges[1] / ratio;
    }
    Some(edges)
}

/// Tensor errors sorted by relative error, largest first, non-finite ones last.
fn sorted_tensor_errors(errors: &[TensorError]) -> Vec<&TensorError> {
    let key = |t: &TensorError| if t.rel_rms.is_finite() { t.rel_rms } else { f64::NEG_INFINITY };
    let mut sorted: Vec<&TensorError> = errors.iter().collect();
    sorted.sort_by(|a, b| key(b).partial_cmp(&key(a)).unwrap_or(Ordering::Equal));
    sorted
}

/// Bars of the relative error of the largest [`TENSOR_BARS`] of `sorted` (largest first), names in
/// tooltips; `None` when none has a finite error.
fn tensor_error_plot(sorted: &[&TensorError]) -> Option<String> {
    let top = &sorted[..sorted.len().min(TENSOR_BARS)];
    let values: Vec<f64> = top.iter().map(|t| t.rel_rms).filter(|v| v.is_finite()).collect();
    if values.is_empty() {
        return None;
    }
    let frame = Frame { left: MARGIN_LEFT, top: 16.0, width: PLOT_WIDTH - MARGIN_LEFT - MARGIN_RIGHT, height: 220.0 };
    let x_axis = index_axis(0.5, top.len() as f64 + 0.5, 10);
    let y_axis = value_axis(&values, true);
    let mut svg =
        Svg::new(PLOT_WIDTH, frame.bottom() + MARGIN_BOTTOM, "Relative weight error per tensor, largest first");
    draw_axes(&mut svg, &frame, &x_axis, &y_axis, "rank", "relative RMS error");
    let band = frame.width / top.len() as f64;
    for (i, t) in top.iter().enumerate() {
        if !t.rel_rms.is_finite() {
            continue;
        }
        let rank = i + 1;
        let x = frame.x(&x_axis, rank as f64) - band * 0.35;
        let y = frame.y(&y_axis, t.rel_rms);
        let tip = format!("#{rank} {} [{}]: {}", t.name, fmt_shape(&t.shape), fmt_sig(t.rel_rms, 3));
        svg.rect(x, y, band * 0.7, frame.bottom() - y, MODEL_COLOR, Some(&tip));
    }
    Some(svg.finish())
}

// ---------------------------------------------------------------------------------------------
// Axes
// ---------------------------------------------------------------------------------------------

/// Linear or logarithmic (base 10) mapping of an axis.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Scale {
    Linear,
    Log,
}

/// An axis: its range and its ticks with their labels.
#[derive(Clone, Debug)]
struct Axis {
    scale: Scale,
    lo: f64,
    hi: f64,
    ticks: Vec<(f64, String)>,
}

impl Axis {
    /// Where `v` lies on the axis, from 0 (at `lo`) to 1 (at `hi`), clamped; 0 when not finite.
    fn fraction(&self, v: f64) -> f64 {
        let f = match self.scale {
            Scale::Linear => (v - self.lo) / (self.hi - self.lo),
            Scale::Log => (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10()),
        };
        if f.is_finite() { f.clamp(0.0, 1.0) } else { 0.0 }
    }
}

/// `(min, max)` of the finite values, `None` when there is none.
fn finite_min_max(values: &[f64]) -> Option<(f64, f64)> {
    values.iter().filter(|v| v.is_finite()).fold(None, |acc, &v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((v.min(lo), v.max(hi))),
    })
}

/// A range with `min < max`: non-finite bounds give `[0, 1]`, an empty range is widened.
fn usable_range(min: f64, max: f64) -> (f64, f64) {
    if !min.is_finite() || !max.is_finite() {
        return (0.0, 1.0);
    }
    let (min, max) = if min <= max { (min, max) } else { (max, min) };
    if max - min > f64::EPSILON * min.abs().max(max.abs()) {
        (min, max)
    } else if min == 0.0 {
        (0.0, 1.0)
    } else {
        (min - min.abs() * 0.1, max + max.abs() * 0.1)
    }
}

/// The tick step of 1, 2 or 5 times a power of ten nearest to `raw`.
fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    let normalized = raw / magnitude;
    let nice = if normalized < 1.5 {
        1.0
    } else if normalized < 3.0 {
        2.0
    } else if normalized < 7.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// The multiples of `step` from `from` to `to` (both included, within rounding), at most 200.
fn multiples_between(from: f64, to: f64, step: f64) -> Vec<f64> {
    let first = (from / step - 1e-9).ceil();
    let last = (to / step + 1e-9).floor();
    if !(first.is_finite() && last.is_finite()) || last < first || last - first > 200.0 {
        return Vec::new();
    }
    (0..=(last - first) as usize).map(|k| (first + k as f64) * step + 0.0).collect()
}

/// Decimals needed to tell ticks `step` apart.
fn decimals_for_step(step: f64) -> usize {
    if step.is_finite() && step > 0.0 { (-(step.log10() + 1e-9).floor()).max(0.0) as usize } else { 0 }
}

/// Labels of linear ticks `step` apart: thousands as "k", millions as "M", tiny steps scientific.
fn linear_tick_labels(ticks: &[f64], step: f64) -> Vec<String> {
    let magnitude = ticks.iter().fold(0.0f64, |m, t| m.max(t.abs()));
    let (divisor, suffix) = if magnitude >= 1e6 {
        (1e6, "M")
    } else if magnitude >= 1e4 {
        (1e3, "k")
    } else {
        (1.0, "")
    };
    let decimals = decimals_for_step(step / divisor);
    ticks
        .iter()
        .map(|&t| {
            if t == 0.0 {
                "0".to_string()
            } else if decimals > 4 {
                format!("{t:.1e}")
            } else {
                format!("{:.*}{suffix}", decimals, t / divisor)
            }
        })
        .collect()
}

/// A linear axis covering `[min, max]` widened to multiples of a nice step, with about `target`
/// ticks.
fn nice_linear_axis(min: f64, max: f64, target: usize) -> Axis {
    let (min, max) = usable_range(min, max);
    let step = nice_step((max - min) / target.max(1) as f64);
    let lo = (min / step).floor() * step + 0.0;
    let hi = (max / step).ceil() * step + 0.0;
    let values = multiples_between(lo, hi, step);
    let labels = linear_tick_labels(&values, step);
    Axis { scale: Scale::Linear, lo, hi, ticks: values.into_iter().zip(labels).collect() }
}

/// A linear axis over exactly `[min, max]` with whole-number ticks (layer, expert or rank
/// numbers), about `target` of them.
fn index_axis(min: f64, max: f64, target: usize) -> Axis {
    let (min, max) = usable_range(min, max);
    let step = nice_step((max - min) / target.max(1) as f64).max(1.0);
    let values = multiples_between(min, max, step);
    let labels = values.iter().map(|v| format!("{v:.0}")).collect();
    let ticks = values.into_iter().zip::<Vec<String>>(labels).collect();
    Axis { scale: Scale::Linear, lo: min, hi: max, ticks }
}

/// A logarithmic axis from the power of ten at or below `min` to the one at or above `max` (both
/// positive), ticks at the powers of ten (every few when there are many) and at 2 and 5 times
/// them when it spans two decades or less.
fn log_axis(min: f64, max: f64) -> Axis {
    if !(min > 0.0 && max > 0.0 && min.is_finite() && max.is_finite()) {
        return nice_linear_axis(min, max, 5);
    }
    let (min, max) = if min <= max { (min, max) } else { (max, min) };
    let lo_exp = (min.log10() + 1e-9).floor();
    let hi_exp = (max.log10() - 1e-9).ceil().max(lo_exp + 1.0);
    let decades = (hi_exp - lo_exp) as usize;
    let mut values = Vec::new();
    let every = decades.div_ceil(10).max(1);
    for d in (0..=decades).step_by(every) {
        let power = 10f64.powf(lo_exp + d as f64);
        values.push(power);
        if decades <= 2 && d < decades {
            values.push(2.0 * power);
            values.push(5.0 * power);
        }
    }
    let labels = values.iter().map(|&v| log_tick_label(v)).collect::<Vec<_>>();
    Axis {
        scale: Scale::Log,
        lo: 10f64.powf(lo_exp),
        hi: 10f64.powf(hi_exp),
        ticks: values.into_iter().zip(labels).collect(),
    }
}

/// Label of a log tick `m × 10^e`: plain from 0.001 to 1000, `me±e` beyond.
fn log_tick_label(v: f64) -> String {
    let exponent = (v.log10() + 1e-9).floor();
    let mantissa = (v / 10f64.powf(exponent)).round();
    if (-3.0..=3.0).contains(&exponent) {
        format!("{:.*}", (-exponent).max(0.0) as usize, v)
    } else {
        format!("{mantissa}e{exponent}")
    }
}

/// An axis for `values`: logarithmic when they are all positive and span more than two decades,
/// linear otherwise (from zero when `from_zero` or when they are all positive and zero is near).
fn value_axis(values: &[f64], from_zero: bool) -> Axis {
    let Some((min, max)) = finite_min_max(values) else {
        return nice_linear_axis(0.0, 1.0, 5);
    };
    if min > 0.0 && max / min > LOG_AXIS_MIN_RATIO {
        return log_axis(min, max);
    }
    let start = if from_zero || (min > 0.0 && min < (max - min)) { min.min(0.0) } else { min };
    nice_linear_axis(start, max, 5)
}

// ---------------------------------------------------------------------------------------------
// SVG drawing
// ---------------------------------------------------------------------------------------------

/// The plotting area of a chart, in pixels.
#[derive(Clone, Copy, Debug)]
struct Frame {
    left: f64,
    top: f64,
    width: f64,
    height: f64,
}

impl Frame {
    fn right(&self) -> f64 {
        self.left + self.width
    }

    fn bottom(&self) -> f64 {
        self.top + self.height
    }

    /// The x pixel of `v` on `axis`.
    fn x(&self, axis: &Axis, v: f64) -> f64 {
        self.left + axis.fraction(v) * self.width
    }

    /// The y pixel of `v` on `axis` (upwards).
    fn y(&self, axis: &Axis, v: f64) -> f64 {
        self.bottom() - axis.fraction(v) * self.height
    }
}

/// Draws grid lines, ticks, tick labels and titles of both axes of `frame`.
fn draw_axes(svg: &mut Svg, frame: &Frame, x: &Axis, y: &Axis, x_title: &str, y_title: &str) {
    for (value, label) in &y.ticks {
        let py = frame.y(y, *value);
        svg.line(frame.left, py, frame.right(), py, GRID_COLOR, "");
        svg.line(frame.left - 4.0, py, frame.left, py, AXIS_COLOR, "");
        svg.text(frame.left - 7.0, py + 4.0, Anchor::End, "", label);
    }
    svg.line(frame.left, frame.top, frame.left, frame.bottom(), AXIS_COLOR, "");
    svg.vertical_text(frame.left - 52.0, frame.top + frame.height / 2.0, "axis", y_title);
    draw_x_axis(svg, frame, x, x_title);
}

/// Draws the x axis line under `frame` with its ticks, labels and title.
fn draw_x_axis(svg: &mut Svg, frame: &Frame, x: &Axis, title: &str) {
    svg.line(frame.left, frame.bottom(), frame.right(), frame.bottom(), AXIS_COLOR, "");
    for (value, label) in &x.ticks {
        let px = frame.x(x, *value);
        svg.line(px, frame.bottom(), px, frame.bottom() + 4.0, AXIS_COLOR, "");
        svg.text(px, frame.bottom() + 17.0, Anchor::Middle, "", label);
    }
    svg.text(frame.left + frame.width / 2.0, frame.bottom() + 36.0, Anchor::Middle, "axis", title);
}

/// How a legend entry is drawn.
#[derive(Clone, Copy, Debug)]
enum LegendKey {
    Bar,
    Line,
    Dash,
}

/// One legend entry.
struct LegendItem {
    color: &'static str,
    label: String,
    key: LegendKey,
}

/// Draws a legend in one row starting at `(left, y)` (`y` is the text baseline).
fn draw_legend(svg: &mut Svg, left: f64, y: f64, items: &[LegendItem]) {
    let mut x = left;
    for item in items {
        match item.key {
            LegendKey::Bar => svg.rect(x, y - 10.0, 14.0, 11.0, item.color, None),
            LegendKey::Line => {
                svg.line(x, y - 4.0, x + 18.0, y - 4.0, item.color, " stroke-width=\"2\"");
                svg.circle(x + 9.0, y - 4.0, 3.2, item.color, None);
            }
            LegendKey::Dash => {
                svg.line(x, y - 4.0, x + 18.0, y - 4.0, item.color, " stroke-width=\"2\" stroke-dasharray=\"5 3\"")
            }
        }
        svg.text(x + 23.0, y, Anchor::Start, "", &item.label);
        x += 23.0 + 7.0 * item.label.chars().count() as f64 + 18.0;
    }
}

/// Horizontal alignment of a text.
#[derive(Clone, Copy, Debug)]
enum Anchor {
    Start,
    Middle,
    End,
}

impl Anchor {
    fn as_str(self) -> &'static str {
        match self {
            Anchor::Start => "start",
            Anchor::Middle => "middle",
            Anchor::End => "end",
        }
    }
}

/// A pixel coordinate with one decimal at most; 0 when not finite, so that no NaN or inf can reach
/// the SVG.
fn coord(v: f64) -> String {
    if !v.is_finite() {
        return "0".to_string();
    }
    let s = format!("{:.1}", v + 0.0);
    match s.strip_suffix(".0") {
        Some(whole) if whole != "-0" => whole.to_string(),
        Some(_) => "0".to_string(),
        None => s,
    }
}

/// A scale factor with four decimals; 1 when not finite.
fn coord_fine(v: f64) -> String {
    if v.is_finite() { format!("{v:.4}") } else { "1".to_string() }
}

/// An SVG document being written. Coordinates go through [`coord`], texts through
/// [`escape_html`].
struct Svg {
    out: String,
}

impl Svg {
    /// Opens an SVG of `width` × `height` pixels; `label` is its accessible name.
    fn new(width: f64, height: f64, label: &str) -> Self {
        let mut out = String::with_capacity(16 * 1024);
        let _ = writeln!(
            out,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
             role=\"img\" aria-label=\"{}\">",
            escape_html(label),
            w = coord(width),
            h = coord(height)
        );
        Self { out }
    }

    /// A line; `extra` holds further attributes, starting with a space.
    fn line(&mut self, x1: f64, y1: f64, x2: f64, y2: f64, stroke: &str, extra: &str) {
        let _ = writeln!(
            self.out,
            "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"{stroke}\"{extra}/>",
            coord(x1),
            coord(y1),
            coord(x2),
            coord(y2)
        );
    }

    /// A filled rectangle with an optional tooltip; negative sizes are drawn as zero.
    fn rect(&mut self, x: f64, y: f64, width: f64, height: f64, fill: &str, tooltip: Option<&str>) {
        let _ = write!(
            self.out,
            "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{fill}\"",
            coord(x),
            coord(y),
            coord(width.max(0.0)),
            coord(height.max(0.0))
        );
        self.close_with_tooltip("rect", tooltip);
    }

    /// A filled circle with an optional tooltip.
    fn circle(&mut self, cx: f64, cy: f64, r: f64, fill: &str, tooltip: Option<&str>) {
        let _ =
            write!(self.out, "<circle cx=\"{}\" cy=\"{}\" r=\"{}\" fill=\"{fill}\"", coord(cx), coord(cy), coord(r));
        self.close_with_tooltip("circle", tooltip);
    }

    /// Ends an element opened up to its attributes, with a `<title>` child when there is a tooltip.
    fn close_with_tooltip(&mut self, element: &str, tooltip: Option<&str>) {
        let _ = match tooltip {
            Some(tip) => writeln!(self.out, "><title>{}</title></{element}>", escape_html(tip)),
            None => writeln!(self.out, "/>"),
        };
    }

    /// An unfilled polyline.
    fn polyline(&mut self, points: &[(f64, f64)], stroke: &str, width: f64) {
        let coords: Vec<String> = points.iter().map(|&(x, y)| format!("{},{}", coord(x), coord(y))).collect();
        let _ = writeln!(
            self.out,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{stroke}\" stroke-width=\"{}\" stroke-linejoin=\"round\"/>",
            coords.join(" "),
            coord(width)
        );
    }

    /// A text with its baseline at `y`; `class` may be empty.
    fn text(&mut self, x: f64, y: f64, anchor: Anchor, class: &str, content: &str) {
        let class = if class.is_empty() { String::new() } else { format!(" class=\"{class}\"") };
        let _ = writeln!(
            self.out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"{}\"{class}>{}</text>",
            coord(x),
            coord(y),
            anchor.as_str(),
            escape_html(content)
        );
    }

    /// A text rotated to read upwards, centred on `(x, y)`.
    fn vertical_text(&mut self, x: f64, y: f64, class: &str, content: &str) {
        let _ = writeln!(
            self.out,
            "<text transform=\"translate({} {}) rotate(-90)\" text-anchor=\"middle\" class=\"{class}\">{}</text>",
            coord(x),
            coord(y),
            escape_html(content)
        );
    }

    /// Closes the document.
    fn finish(mut self) -> String {
        self.out.push_str("</svg>\n");
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Comparison, EvalResult, Histogram, LayerStats, TensorError};

    /// A deterministic pseudo-random sequence in [0, 1).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> f64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    fn kld_histogram() -> Histogram {
        // 1e-6 .. 10, four bins per decade.
        let edges: Vec<f64> = (0..=28).map(|i| 10f64.powf(-6.0 + i as f64 / 4.0)).collect();
        let counts: Vec<u64> = (0..28)
            .map(|i| {
                let x = (i as f64 - 13.0) / 3.5;
                (900.0 * (-x * x / 2.0).exp()).round() as u64
            })
            .collect();
        Histogram { edges, counts }
    }

    fn layer(index: usize, experts: usize, rng: &mut Lcg, with_baseline: bool) -> LayerStats {
        let base: Vec<u64> = (0..experts).map(|_| 200 + (rng.next() * 800.0) as u64).collect();
        let model: Vec<u64> = base.iter().map(|&b| (b as f64 * (0.85 + 0.3 * rng.next())) as u64).collect();
        LayerStats {
            layer: index,
            moe: true,
            expert_load: model,
            baseline_expert_load: with_baseline.then_some(base),
            routing_agreement: with_baseline.then_some(0.97 - 0.0008 * index as f64),
            hidden_rel_err: with_baseline.then_some(0.004 + 0.002 * index as f64),
        }
    }

    fn tensor(i: usize) -> TensorError {
        TensorError {
            name: format!("model.layers.{}.mlp.experts.{}.down_proj.weight", i / 4, i % 4),
            shape: vec![2048, 7168],
            rel_rms: 0.02 + 0.003 * i as f64,
            max_abs: 0.05 + 0.001 * i as f64,
            snr_db: Some(30.0 - i as f64 * 0.2),
        }
    }

    fn sample() -> EvalResult {
        let mut rng = Lcg(7);
        EvalResult {
            model: "/models/DeepSeek-V3-fp8".to_string(),
            model_type: "deepseek_v3".to_string(),
            weights: "fp8 (fp8, f32 scales)".to_string(),
            act_quant: crate::metrics::ActivationQuant::Fp8,
            ctx: 512,
            windows: 8,
            tokens: 4096,
            tokens_scored: 4088,
            nll_mean: 1.8121,
            nll_stderr: 0.0075,
            perplexity: 6.1234,
            perplexity_stderr: 0.0456,
            streamed: true,
            seconds: 123.4,
            tokens_per_second: 456.78,
            layers: (0..3).map(|i| layer(i, 8, &mut rng, true)).collect(),
            baseline: Some(Comparison {
                baseline_model: "/models/DeepSeek-V3-bf16".to_string(),
                baseline_perplexity: 6.0,
                baseline_perplexity_stderr: 0.0441,
                baseline_nll_mean: 1.7918,
                kld_mean: 0.00412,
                kld_p99: 0.0356,
                kld_max: 0.912,
                kld_histogram: kld_histogram(),
                top1_agreement: 0.9731,
                routing_agreement: 0.9412,
                tensor_errors: (0..10).map(tensor).collect(),
            }),
        }
    }

    fn big(layers: usize, experts: usize) -> EvalResult {
        let mut r = sample();
        let mut rng = Lcg(11);
        r.layers = (0..layers)
            .map(|i| {
                if i < 3 {
                    LayerStats { layer: i, hidden_rel_err: Some(0.001 * (i + 1) as f64), ..LayerStats::default() }
                } else {
                    layer(i, experts, &mut rng, true)
                }
            })
            .collect();
        if let Some(c) = r.baseline.as_mut() {
            let projections = ["gate_proj", "up_proj", "down_proj"];
            c.tensor_errors = (0..5000)
                .map(|i| TensorError {
                    name: format!(
                        "model.layers.{}.mlp.experts.{}.{}.weight",
                        3 + i / 768,
                        i / 3 % 256,
                        projections[i % 3]
                    ),
                    shape: vec![2048, 7168],
                    rel_rms: 0.024 + 0.004 * rng.next() + if i % 997 == 0 { 0.02 } else { 0.0 },
                    max_abs: 0.01 + 0.05 * rng.next(),
                    snr_db: Some(31.0 + 2.0 * rng.next()),
                })
                .collect();
        }
        r
    }

    fn count(haystack: &str, needle: &str) -> usize {
        haystack.matches(needle).count()
    }

    fn assert_well_formed(html: &str) {
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.ends_with("</html>\n"));
        assert_eq!(count(html, "<svg"), count(html, "</svg>"));
        assert!(!html.contains("NaN"), "NaN in output");
        assert!(!html.contains("=\"inf") && !html.contains("=\"-inf") && !html.contains(",inf"));
        assert_eq!(count(html, "<script"), 1);
        assert_eq!(count(html, "</script>"), 1);
    }

    fn embedded(html: &str) -> EvalResult {
        let start = html.find("id=\"fp8forge-result\">").expect("json element") + "id=\"fp8forge-result\">".len();
        let end = html[start..].find("</script>").expect("script end") + start;
        serde_json::from_str(&html[start..end]).expect("embedded JSON parses")
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * a.abs().max(b.abs())
    }

    #[test]
    fn renders_sample_with_headline_figures_and_plots() {
        let r = sample();
        let html = render_html(&r);
        assert_well_formed(&html);
        for expected in [
            "/models/DeepSeek-V3-fp8",
            "/models/DeepSeek-V3-bf16",
            "fp8 (fp8, f32 scales)",
            "512 tokens × 8 windows",
            "4,088 of 4,096",
            "6.1234 ± 0.0456",
            "6.0000 ± 0.0441",
            "<b>+2.06%</b>",
            "0.00412 / 0.0356 / 0.912 nats",
            "97.31%",
            "94.12%",
            "<td>Streamed</td><td>yes</td>",
            "123.4 s",
            "456.8 tokens/s",
        ] {
            assert!(html.contains(expected), "missing {expected:?}");
        }
        // Hidden error, routing agreement, expert load, KLD histogram, tensor errors.
        assert_eq!(count(&html, "<svg"), 5);
        // Grouped bars: 3 layers × 8 experts × 2 series, each with a tooltip.
        assert_eq!(count(&html, ", expert "), 48);
        assert!(html.contains("layer 2 (routing agreement 96.84%)"));
        // Markers and legend of the histogram.
        assert!(html.contains("mean = 0.00412") && html.contains("p99 = 0.0356"));
        // 10 tensors: 10 bars and 10 table rows, largest (index 9) first.
        assert_eq!(count(&html, "down_proj.weight [2048×7168]"), 10);
        let first = html.find("model.layers.2.mlp.experts.1.down_proj.weight").expect("largest tensor");
        let last = html.find("model.layers.0.mlp.experts.0.down_proj.weight").expect("smallest tensor");
        assert!(first < last);
        assert!(html.contains("the 10 largest of 10 tensors"));

        let back = embedded(&html);
        assert_eq!(back.model, r.model);
        assert!(close(back.perplexity, r.perplexity));
        assert_eq!(back.layers.len(), 3);
        assert_eq!(back.layers[1].expert_load, r.layers[1].expert_load);
        let (c, c0) = (back.baseline.expect("baseline survives"), r.baseline.expect("baseline"));
        assert!(close(c.kld_mean, c0.kld_mean) && close(c.kld_p99, c0.kld_p99));
        assert!(close(c.baseline_perplexity, c0.baseline_perplexity));
        assert_eq!(c.kld_histogram.counts, c0.kld_histogram.counts);
        assert_eq!(c.tensor_errors.len(), 10);
    }

    #[test]
    fn renders_without_baseline() {
        let mut rng = Lcg(3);
        let mut r = sample();
        r.baseline = None;
        r.layers = (0..3).map(|i| layer(i, 8, &mut rng, false)).collect();
        let html = render_html(&r);
        assert_well_formed(&html);
        assert!(html.contains("No baseline was given"));
        assert!(html.contains("6.1234 ± 0.0456"));
        assert!(!html.contains("Perplexity (baseline)"));
        assert!(!html.contains("KL divergence per token"));
        assert!(!html.contains("Weight error per tensor"));
        // Only the expert load, with the model's bars alone.
        assert_eq!(count(&html, "<svg"), 1);
        assert_eq!(count(&html, ", expert "), 24);
        assert!(!html.contains(">baseline</text>"));
        assert!(embedded(&html).baseline.is_none());
    }

    #[test]
    fn large_model_gets_a_compact_expert_plot() {
        let html = render_html(&big(61, 256));
        assert_well_formed(&html);
        assert!(html.len() < 2_000_000, "{} bytes", html.len());
        assert!(html.contains("max / mean load"));
        assert!(html.contains("load of each expert, model / baseline"));
        assert_eq!(count(&html, "<svg"), 5);
        assert!(html.contains("the 50 largest of 5,000 tensors"));
        assert_eq!(count(&html, "<title>#"), 50);
        assert_eq!(count(&html, "<tr><td class=\"num\">"), 20);
        let back = embedded(&html);
        assert_eq!(back.layers.len(), 61);
        assert_eq!(back.layers[60].expert_load.len(), 256);
    }

    #[test]
    fn escapes_names() {
        let mut r = sample();
        r.model = "/m/<&\">".to_string();
        if let Some(c) = r.baseline.as_mut() {
            c.tensor_errors[9].name = "w<&\"></script>".to_string();
        }
        let html = render_html(&r);
        assert_well_formed(&html);
        assert!(html.contains("/m/&lt;&amp;&quot;&gt;"));
        assert!(html.contains("w&lt;&amp;&quot;&gt;&lt;/script&gt;"));
        assert!(!html.contains("<&\">"));
        let back = embedded(&html);
        assert_eq!(back.model, "/m/<&\">");
        assert_eq!(back.baseline.expect("baseline").tensor_errors[9].name, "w<&\"></script>");
    }

    #[test]
    fn survives_non_finite_and_degenerate_input() {
        let mut r = sample();
        r.perplexity = f64::NAN;
        r.tokens_per_second = f64::INFINITY;
        r.layers = vec![LayerStats {
            layer: 0,
            moe: true,
            expert_load: vec![0; 4],
            baseline_expert_load: Some(vec![0, 5, 0, 0]),
            routing_agreement: Some(f64::NAN),
            hidden_rel_err: Some(f64::INFINITY),
        }];
        if let Some(c) = r.baseline.as_mut() {
            c.kld_mean = f64::NAN;
            c.kld_p99 = f64::INFINITY;
            c.kld_histogram.counts.iter_mut().for_each(|n| *n = 0);
            c.tensor_errors[0].rel_rms = f64::NAN;
            c.tensor_errors[1].snr_db = None;
        }
        let html = render_html(&r);
        assert_well_formed(&html);
        assert!(html.contains("n/a ± 0.0456"));
        assert!(html.contains("n/a tokens/s"));
        assert!(html.contains("No per-layer hidden-state errors"));
        assert!(html.contains("No KL divergence histogram"));
        assert!(html.contains(">equal</td>"));
        // Expert load of the single layer and the tensor errors remain.
        assert_eq!(count(&html, "<svg"), 2);

        let empty = EvalResult { baseline: Some(Comparison::default()), ..EvalResult::default() };
        let html = render_html(&empty);
        assert_well_formed(&html);
        assert_eq!(count(&html, "<svg"), 0);
        assert!(html.contains("No MoE layer"));
    }

    #[test]
    fn single_layer_and_log_scaled_errors() {
        let mut r = sample();
        r.layers.truncate(1);
        let html = render_html(&r);
        assert_well_formed(&html);
        assert_eq!(count(&html, "<polyline"), 0);
        assert!(html.contains("<title>layer 0: 0.00400</title>"));

        let mut rng = Lcg(5);
        r.layers = (0..4).map(|i| layer(i, 8, &mut rng, true)).collect();
        for (i, l) in r.layers.iter_mut().enumerate() {
            l.hidden_rel_err = Some(10f64.powi(i as i32 - 5));
        }
        let html = render_html(&r);
        assert!(html.contains(">1e-5</text>") && html.contains(">0.01</text>"));
    }

    #[test]
    fn linear_ticks_are_nice() {
        let axis = nice_linear_axis(0.0, 7.3, 4);
        let values: Vec<f64> = axis.ticks.iter().map(|t| t.0).collect();
        assert_eq!(values, vec![0.0, 2.0, 4.0, 6.0, 8.0]);
        assert_eq!((axis.lo, axis.hi), (0.0, 8.0));
        let axis = nice_linear_axis(0.0, 0.0372, 5);
        let labels: Vec<&str> = axis.ticks.iter().map(|t| t.1.as_str()).collect();
        assert_eq!(labels, vec!["0", "0.01", "0.02", "0.03", "0.04"]);
        let axis = nice_linear_axis(0.0, 41_000.0, 4);
        let labels: Vec<&str> = axis.ticks.iter().map(|t| t.1.as_str()).collect();
        assert_eq!(labels, vec!["0", "10k", "20k", "30k", "40k", "50k"]);
        let axis = nice_linear_axis(3.0, 3.0, 5);
        assert!(axis.lo < 3.0 && axis.hi > 3.0);
        let axis = index_axis(-0.5, 60.5, 12);
        assert_eq!(axis.ticks.first().map(|t| t.1.as_str()), Some("0"));
        assert_eq!(axis.ticks.last().map(|t| t.1.as_str()), Some("60"));
        assert_eq!(axis.ticks.len(), 13);
        assert_eq!(index_axis(-0.5, 0.5, 10).ticks.len(), 1);
    }

    #[test]
    fn log_ticks_cover_decades() {
        let axis = log_axis(3e-5, 0.4);
        let labels: Vec<&str> = axis.ticks.iter().map(|t| t.1.as_str()).collect();
        assert_eq!(labels, vec!["1e-5", "1e-4", "0.001", "0.01", "0.1", "1"]);
        assert_eq!(axis.scale, Scale::Log);
        let axis = log_axis(0.012, 0.3);
        let labels: Vec<&str> = axis.ticks.iter().map(|t| t.1.as_str()).collect();
        assert_eq!(labels, vec!["0.01", "0.02", "0.05", "0.1", "0.2", "0.5", "1"]);
        assert!((axis.fraction(0.1) - 0.5).abs() < 1e-12);
        assert_eq!(axis.fraction(f64::NAN), 0.0);
        let axis = log_axis(1e-12, 1e12);
        let labels: Vec<&str> = axis.ticks.iter().map(|t| t.1.as_str()).collect();
        assert_eq!(labels, vec!["1e-12", "1e-9", "1e-6", "0.001", "1", "1000", "1e6", "1e9", "1e12"]);
        assert_eq!(value_axis(&[0.001, 0.5], false).scale, Scale::Log);
        assert_eq!(value_axis(&[0.01, 0.5], false).scale, Scale::Linear);
    }

    #[test]
    fn formats_numbers() {
        assert_eq!(fmt_sig(0.004123, 3), "0.00412");
        assert_eq!(fmt_sig(12.345, 3), "12.3");
        assert_eq!(fmt_sig(0.0000123, 3), "1.23e-5");
        assert_eq!(fmt_sig(f64::NAN, 3), "n/a");
        assert_eq!(fmt_relative_change(6.1234, 6.0), "+2.06%");
        assert_eq!(fmt_relative_change(5.97, 6.0), "-0.50%");
        assert_eq!(fmt_relative_change(1.0, 0.0), "n/a");
        assert_eq!(fmt_count(1_234_567), "1,234,567");
        assert_eq!(fmt_count(999), "999");
        assert_eq!(coord(f64::NAN), "0");
        assert_eq!(coord(-0.01), "0");
        assert_eq!(coord(12.25), "12.2");
        assert_eq!(coord(3.0), "3");
        assert_eq!(escape_html("<a href='x'>&"), "&lt;a href=&#39;x&#39;&gt;&amp;");
    }

    #[test]
    fn heat_levels_are_symmetric() {
        assert_eq!(heat_level(0.0), Some(HEAT_LEVELS / 2));
        assert_eq!(heat_level(-5.0), Some(0));
        assert_eq!(heat_level(5.0), Some(HEAT_LEVELS - 1));
        assert_eq!(heat_level(f64::NAN), None);
        assert_eq!(heat_color(HEAT_LEVELS / 2), "#f2f2f2");
        let layer = LayerStats {
            expert_load: vec![0, 10, 0, 20],
            baseline_expert_load: Some(vec![0, 0, 10, 10]),
            ..LayerStats::default()
        };
        assert_eq!(load_log2_ratios(&layer), vec![0.0, HEAT_LOG2_LIMIT, -HEAT_LOG2_LIMIT, 1.0]);
    }

    /// Writes the sample page for a look in a browser: `cargo test -- --ignored write_sample_pages`.
    #[test]
    #[ignore]
    fn write_sample_pages() {
        std::fs::write("/tmp/report_sample.html", render_html(&sample())).expect("write sample");
        std::fs::write("/tmp/report_big.html", render_html(&big(61, 256))).expect("write big sample");
    }
}
