//! The report's plots, each a function from the figures of an [`EvalResult`] part to an SVG
//! ([`Markup`]), or `None` when there is nothing to draw: per-layer hidden-state error and routing
//! agreement, expert load (grouped bars for a few small layers; an imbalance line and a heat strip
//! for many), the distribution of the per-token KL divergence, and the largest per-tensor errors.
//! Non-finite values are left out.
//!
//! [`EvalResult`]: crate::metrics::EvalResult

use std::cmp::Ordering;
use std::fmt::Write as _;

use maud::Markup;

use super::axis::{Axis, finite_min_max, index_axis, log_axis, nice_linear_axis, value_axis};
use super::format::{fmt_count, fmt_percent, fmt_shape, fmt_sig};
use super::svg::{AXIS_COLOR, Anchor, Frame, LegendItem, LegendKey, Svg, draw_axes, draw_legend, draw_x_axis};
use crate::metrics::{Comparison, Histogram, LayerStats, TensorError};

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

/// Bars of the per-tensor error plot.
pub(super) const TENSOR_BARS: usize = 50;
/// Expert load is drawn as one grouped bar chart per MoE layer up to this many MoE layers...
const DETAILED_MAX_LAYERS: usize = 6;
/// ...and this many experts per layer; beyond, as a per-layer summary and a heat strip.
const DETAILED_MAX_EXPERTS: usize = 64;
/// Colour levels of the heat strip (odd, so that the middle one is "no change").
const HEAT_LEVELS: usize = 9;
/// The heat strip's colour scale saturates at this log2 ratio (1: half and double).
const HEAT_LOG2_LIMIT: f64 = 1.0;

/// Per-layer relative error of the hidden states, or `None` when no layer has one.
pub(super) fn hidden_error_plot(layers: &[LayerStats]) -> Option<Markup> {
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
pub(super) fn routing_agreement_plot(layers: &[LayerStats]) -> Option<Markup> {
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
    /// Position on the x axis.
    x: f64,
    /// Position on the y axis.
    y: f64,
    /// Tooltip.
    tip: String,
}

/// A named series of a line plot.
struct Series {
    /// Legend text.
    label: String,
    /// Colour of line and markers.
    color: &'static str,
    /// The points, in x order.
    points: Vec<Point>,
}

/// A line plot with points of `series` over a layer-index x axis, or `None` when no series has a
/// point. The y axis is logarithmic when the values span more than two decades.
fn line_plot(series: &[Series], x_title: &str, y_title: &str, label: &str) -> Option<Markup> {
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

/// An expert load plot with a sentence saying how to read it.
pub(super) struct ExpertLoadPlot {
    /// The plot.
    pub(super) svg: Markup,
    /// How to read it, for the text above it.
    pub(super) reading: &'static str,
}

/// The expert load plot: grouped bars per expert and layer for a few small layers, a per-layer
/// imbalance summary and a heat strip otherwise. `None` without MoE layers.
pub(super) fn expert_load_plot(layers: &[LayerStats]) -> Option<ExpertLoadPlot> {
    let moe = moe_layers(layers);
    if moe.is_empty() {
        return None;
    }
    let experts = moe.iter().map(|l| expert_count(l)).max().unwrap_or(0);
    let has_baseline = moe.iter().any(|l| l.baseline_expert_load.is_some());
    let plot = if moe.len() <= DETAILED_MAX_LAYERS && experts <= DETAILED_MAX_EXPERTS {
        let reading = if has_baseline {
            "Tokens routed to each expert of each MoE layer, the baseline's bar beside the model's."
        } else {
            "Tokens routed to each expert of each MoE layer."
        };
        ExpertLoadPlot { svg: expert_load_bars(&moe, experts), reading }
    } else {
        let reading = if has_baseline {
            "Top: per MoE layer, the busiest expert's load over the mean load (1 would be perfectly even). \
             Below, one row per layer: each expert's load in the model over its load in the baseline, red \
             where the model routes more tokens to the expert, blue where fewer."
        } else {
            "Top: per MoE layer, the busiest expert's load over the mean load (1 would be perfectly even). \
             Below, one row per layer: each expert's load over the layer's mean load, red for busier \
             experts, blue for idler ones."
        };
        ExpertLoadPlot { svg: expert_load_summary(&moe, experts), reading }
    };
    Some(plot)
}

/// Experts of a layer: the longer of the model's and the baseline's load vectors.
fn expert_count(layer: &LayerStats) -> usize {
    layer.expert_load.len().max(layer.baseline_expert_load.as_ref().map_or(0, Vec::len))
}

/// One grouped bar chart (baseline and model load per expert) per MoE layer, stacked in one SVG.
fn expert_load_bars(moe: &[&LayerStats], experts: usize) -> Markup {
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
fn expert_load_summary(moe: &[&LayerStats], experts: usize) -> Markup {
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
    let paths: Vec<(String, String)> = paths.into_iter().enumerate().map(|(level, d)| (heat_color(level), d)).collect();
    let cell_width = frame.width / experts.max(1) as f64;
    let cell_height = frame.height / rows.len().max(1) as f64;
    svg.scaled_paths(frame.left, frame.top, cell_width, cell_height, &paths);
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
pub(super) fn kld_histogram_plot(c: &Comparison) -> Option<Markup> {
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
pub(super) fn sorted_tensor_errors(errors: &[TensorError]) -> Vec<&TensorError> {
    let key = |t: &TensorError| if t.rel_rms.is_finite() { t.rel_rms } else { f64::NEG_INFINITY };
    let mut sorted: Vec<&TensorError> = errors.iter().collect();
    sorted.sort_by(|a, b| key(b).partial_cmp(&key(a)).unwrap_or(Ordering::Equal));
    sorted
}

/// Bars of the relative error of the largest [`TENSOR_BARS`] of `sorted` (largest first), names in
/// tooltips; `None` when none has a finite error.
pub(super) fn tensor_error_plot(sorted: &[&TensorError]) -> Option<Markup> {
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn heat_strip_merges_runs_of_a_colour() {
        let mut svg = Svg::new(100.0, 100.0, "heat");
        let frame = Frame { left: 0.0, top: 0.0, width: 40.0, height: 20.0 };
        let rows = vec![vec![0.0, 0.0, 0.0, 5.0], vec![f64::NAN, -5.0, -5.0, 0.0]];
        draw_heat_strip(&mut svg, &frame, &rows, 4);
        let out = svg.finish().into_string();
        let mid = heat_color(HEAT_LEVELS / 2);
        assert!(out.contains(&format!("<path fill=\"{mid}\" d=\"M0 0h3v1h-3zM3 1h1v1h-1z\"/>")), "{out}");
        assert!(out.contains("d=\"M1 1h2v1h-2z\""), "{out}");
        assert!(out.contains("scale(10.0000 10.0000)"), "{out}");
    }

    #[test]
    fn tensor_errors_sort_largest_first_non_finite_last() {
        let t = |name: &str, rel_rms: f64| TensorError { name: name.to_string(), rel_rms, ..TensorError::default() };
        let errors = [t("a", 0.01), t("b", f64::NAN), t("c", 0.03), t("d", 0.02)];
        let names: Vec<&str> = sorted_tensor_errors(&errors).iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, vec!["c", "d", "a", "b"]);
    }
}
