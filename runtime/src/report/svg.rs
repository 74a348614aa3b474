//! A small SVG writer and the chart furniture built on it: the plotting frame, axes with ticks and
//! titles, legends. Coordinates go through [`coord`] (one decimal, never NaN or inf), texts and
//! tooltips through maud's escaper, and a finished document is [`Markup`], which the page embeds
//! as it is.
//!
//! Written here rather than with plotters' SVG backend, which was tried (0.3.7, `svg_backend`
//! only): it has no way to give an element a `<title>` (the report's tooltips: a tensor's name on
//! its bar, an expert's load on its cell), it writes one `<rect>` per cell, so DeepSeek-V3's
//! 61 × 256 expert heat strip takes 1.3 MB against 145 kB as merged paths here, and its default
//! tick labels ("1.0", "0.0001") read worse than [`super::axis`]'s.

use std::fmt::Write as _;

use maud::{Escaper, Markup, PreEscaped};

use super::axis::Axis;

/// Colour of grid lines.
const GRID_COLOR: &str = "#e3e3e3";
/// Colour of axis lines and tick marks.
pub(super) const AXIS_COLOR: &str = "#555";

/// The plotting area of a chart, in pixels.
#[derive(Clone, Copy, Debug)]
pub(super) struct Frame {
    /// Distance of the left edge from the left of the SVG.
    pub(super) left: f64,
    /// Distance of the top edge from the top of the SVG.
    pub(super) top: f64,
    /// Width of the area.
    pub(super) width: f64,
    /// Height of the area.
    pub(super) height: f64,
}

impl Frame {
    /// The x pixel of the right edge.
    pub(super) fn right(&self) -> f64 {
        self.left + self.width
    }

    /// The y pixel of the bottom edge.
    pub(super) fn bottom(&self) -> f64 {
        self.top + self.height
    }

    /// The x pixel of `v` on `axis`.
    pub(super) fn x(&self, axis: &Axis, v: f64) -> f64 {
        self.left + axis.fraction(v) * self.width
    }

    /// The y pixel of `v` on `axis` (upwards).
    pub(super) fn y(&self, axis: &Axis, v: f64) -> f64 {
        self.bottom() - axis.fraction(v) * self.height
    }
}

/// Draws grid lines, ticks, tick labels and titles of both axes of `frame`.
pub(super) fn draw_axes(svg: &mut Svg, frame: &Frame, x: &Axis, y: &Axis, x_title: &str, y_title: &str) {
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
pub(super) fn draw_x_axis(svg: &mut Svg, frame: &Frame, x: &Axis, title: &str) {
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
pub(super) enum LegendKey {
    /// A filled square, for bars.
    Bar,
    /// A line with a marker, for line series.
    Line,
    /// A dashed line, for markers across a plot.
    Dash,
}

/// One legend entry.
pub(super) struct LegendItem {
    /// Colour of the key.
    pub(super) color: &'static str,
    /// Text beside the key.
    pub(super) label: String,
    /// How the key is drawn.
    pub(super) key: LegendKey,
}

/// Draws a legend in one row starting at `(left, y)` (`y` is the text baseline).
pub(super) fn draw_legend(svg: &mut Svg, left: f64, y: f64, items: &[LegendItem]) {
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
pub(super) enum Anchor {
    /// The text starts at the point.
    Start,
    /// The text is centred on the point.
    Middle,
    /// The text ends at the point.
    End,
}

impl Anchor {
    /// The value of SVG's `text-anchor`.
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
pub(super) fn coord(v: f64) -> String {
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

/// An SVG document being written.
pub(super) struct Svg {
    /// The markup so far.
    out: String,
}

impl Svg {
    /// Opens an SVG of `width` × `height` pixels; `label` is its accessible name.
    pub(super) fn new(width: f64, height: f64, label: &str) -> Self {
        let mut out = String::with_capacity(16 * 1024);
        let _ = write!(
            out,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
             role=\"img\" aria-label=\"",
            w = coord(width),
            h = coord(height)
        );
        let mut svg = Self { out };
        svg.escaped(label);
        svg.out.push_str("\">\n");
        svg
    }

    /// Appends `text` escaped for HTML text and double-quoted attribute values.
    fn escaped(&mut self, text: &str) {
        let _ = Escaper::new(&mut self.out).write_str(text);
    }

    /// A line; `extra` holds further attributes, starting with a space.
    pub(super) fn line(&mut self, x1: f64, y1: f64, x2: f64, y2: f64, stroke: &str, extra: &str) {
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
    pub(super) fn rect(&mut self, x: f64, y: f64, width: f64, height: f64, fill: &str, tooltip: Option<&str>) {
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
    pub(super) fn circle(&mut self, cx: f64, cy: f64, r: f64, fill: &str, tooltip: Option<&str>) {
        let _ =
            write!(self.out, "<circle cx=\"{}\" cy=\"{}\" r=\"{}\" fill=\"{fill}\"", coord(cx), coord(cy), coord(r));
        self.close_with_tooltip("circle", tooltip);
    }

    /// Ends an element opened up to its attributes, with a `<title>` child when there is a tooltip.
    fn close_with_tooltip(&mut self, element: &str, tooltip: Option<&str>) {
        match tooltip {
            Some(tip) => {
                self.out.push_str("><title>");
                self.escaped(tip);
                let _ = writeln!(self.out, "</title></{element}>");
            }
            None => self.out.push_str("/>\n"),
        }
    }

    /// An unfilled polyline.
    pub(super) fn polyline(&mut self, points: &[(f64, f64)], stroke: &str, width: f64) {
        let coords: Vec<String> = points.iter().map(|&(x, y)| format!("{},{}", coord(x), coord(y))).collect();
        let _ = writeln!(
            self.out,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{stroke}\" stroke-width=\"{}\" stroke-linejoin=\"round\"/>",
            coords.join(" "),
            coord(width)
        );
    }

    /// Filled paths `(fill, d)` whose data is in units of `scale_x` × `scale_y` pixels from
    /// `(left, top)`: one transform for all of them keeps the path data to small integers.
    pub(super) fn scaled_paths(&mut self, left: f64, top: f64, scale_x: f64, scale_y: f64, paths: &[(String, String)]) {
        let _ = write!(
            self.out,
            "<g transform=\"translate({} {}) scale({} {})\">",
            coord(left),
            coord(top),
            coord_fine(scale_x),
            coord_fine(scale_y)
        );
        for (fill, d) in paths.iter().filter(|(_, d)| !d.is_empty()) {
            let _ = write!(self.out, "<path fill=\"{fill}\" d=\"{d}\"/>");
        }
        self.out.push_str("</g>\n");
    }

    /// A text with its baseline at `y`; `class` may be empty.
    pub(super) fn text(&mut self, x: f64, y: f64, anchor: Anchor, class: &str, content: &str) {
        let class = if class.is_empty() { String::new() } else { format!(" class=\"{class}\"") };
        let _ =
            write!(self.out, "<text x=\"{}\" y=\"{}\" text-anchor=\"{}\"{class}>", coord(x), coord(y), anchor.as_str());
        self.escaped(content);
        self.out.push_str("</text>\n");
    }

    /// A text rotated to read upwards, centred on `(x, y)`.
    pub(super) fn vertical_text(&mut self, x: f64, y: f64, class: &str, content: &str) {
        let _ = write!(
            self.out,
            "<text transform=\"translate({} {}) rotate(-90)\" text-anchor=\"middle\" class=\"{class}\">",
            coord(x),
            coord(y)
        );
        self.escaped(content);
        self.out.push_str("</text>\n");
    }

    /// Closes the document.
    pub(super) fn finish(mut self) -> Markup {
        self.out.push_str("</svg>\n");
        PreEscaped(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::axis::{index_axis, nice_linear_axis};

    #[test]
    fn coordinates_are_short_and_finite() {
        assert_eq!(coord(f64::NAN), "0");
        assert_eq!(coord(-0.01), "0");
        assert_eq!(coord(12.25), "12.2");
        assert_eq!(coord(3.0), "3");
        assert_eq!(coord_fine(f64::INFINITY), "1");
    }

    #[test]
    fn texts_and_tooltips_are_escaped() {
        let mut svg = Svg::new(10.0, 10.0, "a \"label\"");
        svg.text(0.0, 0.0, Anchor::Start, "", "<a href='x'>&");
        svg.rect(0.0, 0.0, 1.0, 1.0, "#000", Some("</title><script>"));
        let out = svg.finish().into_string();
        assert!(out.contains("aria-label=\"a &quot;label&quot;\""), "{out}");
        assert!(out.contains(">&lt;a href='x'&gt;&amp;</text>"), "{out}");
        assert!(out.contains("<title>&lt;/title&gt;&lt;script&gt;</title></rect>"), "{out}");
        assert!(!out.contains("<script"));
    }

    #[test]
    fn frame_maps_axes_upwards() {
        let frame = Frame { left: 10.0, top: 20.0, width: 100.0, height: 50.0 };
        let x = index_axis(0.0, 10.0, 5);
        let y = nice_linear_axis(0.0, 1.0, 5);
        assert_eq!((frame.x(&x, 0.0), frame.x(&x, 10.0)), (10.0, 110.0));
        assert_eq!((frame.y(&y, 0.0), frame.y(&y, 1.0)), (70.0, 20.0));
        assert_eq!((frame.right(), frame.bottom()), (110.0, 70.0));
    }

    #[test]
    fn scaled_paths_skip_empty_ones() {
        let mut svg = Svg::new(10.0, 10.0, "heat");
        let paths = [("#fff".to_string(), String::new()), ("#000".to_string(), "M0 0h1v1h-1z".to_string())];
        svg.scaled_paths(1.0, 2.0, 0.5, f64::NAN, &paths);
        let out = svg.finish().into_string();
        assert!(
            out.contains(
                "<g transform=\"translate(1 2) scale(0.5000 1)\"><path fill=\"#000\" d=\"M0 0h1v1h-1z\"/></g>"
            )
        );
        assert_eq!(out.matches("<path").count(), 1);
    }
}
