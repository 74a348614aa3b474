//! The HTML report of `fp8forge eval`: one self-contained page (inline CSS and SVG, no scripts, no
//! external resources) with the verdict first (what the model costs in perplexity against a budget
//! of +1% over its baseline, with top-1 agreement and KL divergence), then plots of the per-layer,
//! per-expert, per-token and per-tensor figures, the worst tensors, every figure in a table, and
//! the result itself as embedded JSON.
//!
//! - [`page`]: the page as maud templates, which escape every string they interpolate;
//! - [`verdict`]: the verdict and its budget;
//! - [`plots`]: the report's plots, each from figures to an SVG;
//! - [`svg`]: the SVG writer and chart furniture (frame, axes, legends), and why it is not plotters;
//! - [`axis`]: tick arithmetic of linear, index and logarithmic axes;
//! - [`format`]: numbers as the page writes them ("n/a" for anything not finite).

mod axis;
mod format;
mod page;
mod plots;
mod svg;
mod verdict;

use crate::metrics::EvalResult;

/// Renders the result of `fp8forge eval` as one self-contained HTML page: the verdict, inline SVG
/// plots (per-layer hidden-state error and routing agreement, expert load, the distribution of the
/// KL divergence, per-tensor weight error), the worst tensors, a table of every figure, and `r`
/// itself as JSON in a `<script type="application/json" id="fp8forge-result">` element.
///
/// Without a baseline the page says so and shows the model's own figures and its expert load.
/// Non-finite values are shown as "n/a" and left out of the plots.
pub fn render_html(r: &EvalResult) -> String {
    page::page(r)
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

    /// The figures llama.cpp also reports, each distinct so that a test can find it on the page.
    fn llama_cpp_figures() -> Comparison {
        Comparison {
            kld_mean_stderr: 0.000123,
            kld_percentiles: crate::metrics::KldPercentiles {
                p99_9: 0.211,
                p99: 0.0356,
                p95: 0.0147,
                p90: 0.00873,
                p50: 0.00105,
                p10: 3.21e-5,
                p5: 8.76e-6,
                p1: 4.32e-7,
            },
            ln_ppl_ratio: 0.020364,
            ln_ppl_ratio_stderr: 0.001234,
            delta_p_mean: -0.001234,
            delta_p_mean_stderr: 0.000456,
            delta_p_rms: 0.02345,
            delta_p_rms_stderr: 0.000678,
            top1_agreement_stderr: 0.00253,
            top5_agreement: 0.9952,
            top5_overlap: 0.9018,
            ..Comparison::default()
        }
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
                ..llama_cpp_figures()
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

    /// The sample as evaluated without `--baseline`.
    fn without_baseline(layers: usize, experts: usize) -> EvalResult {
        let mut rng = Lcg(3);
        let mut r = sample();
        r.baseline = None;
        r.layers = (0..layers).map(|i| layer(i, experts, &mut rng, false)).collect();
        r
    }

    #[test]
    fn renders_without_baseline() {
        let html = render_html(&without_baseline(3, 8));
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

    /// Where `needle` first occurs in `html`, failing with its name when it does not.
    fn position(html: &str, needle: &str) -> usize {
        html.find(needle).unwrap_or_else(|| panic!("missing {needle:?}"))
    }

    #[test]
    fn verdict_over_budget_comes_first_then_the_sections_in_order() {
        let html = render_html(&sample());
        for expected in [
            "<section class=\"verdict over\">",
            "over budget</span>FP8 costs +2.06% perplexity (6.0000 → 6.1234)",
            "Budget: at most +1.0% perplexity over the baseline. Exceeded by 1.06 percentage points.",
            "97.31%</span><span class=\"label\">top-1 agreement",
            "0.00412 nats</span><span class=\"label\">KL divergence, mean per token",
        ] {
            assert!(html.contains(expected), "missing {expected:?}");
        }
        let order = [
            "<section class=\"verdict",
            "<h2>Hidden-state error per layer",
            "<h2>Routing agreement per layer",
            "<h2>Expert load",
            "<h2>KL divergence per token",
            "<h2>Weight error per tensor",
            "<h2>All figures",
            "id=\"fp8forge-result\"",
        ];
        for pair in order.windows(2) {
            assert!(position(&html, pair[0]) < position(&html, pair[1]), "{:?} not before {:?}", pair[0], pair[1]);
        }
        assert!(position(&html, "</section>") < position(&html, "<svg"));
    }

    #[test]
    fn verdict_within_budget_and_when_perplexity_falls() {
        let mut r = sample();
        r.perplexity = 6.03;
        let html = render_html(&r);
        assert!(html.contains("<section class=\"verdict within\">"));
        assert!(html.contains("within budget</span>FP8 costs +0.50% perplexity (6.0000 → 6.0300)"));
        assert!(html.contains("0.50 percentage points to spare."));
        r.perplexity = 5.97;
        let html = render_html(&r);
        assert!(html.contains("within budget</span>FP8 costs no perplexity: -0.50% (6.0000 → 5.9700)"));
        r.weights = "bf16".to_string();
        r.act_quant = crate::metrics::ActivationQuant::None;
        assert!(render_html(&r).contains("</span>The model costs no perplexity"));
    }

    #[test]
    fn verdict_without_baseline_or_without_a_number() {
        let html = render_html(&without_baseline(3, 8));
        assert!(html.contains("<section class=\"verdict unknown\">"));
        assert!(html.contains("no verdict</span>No baseline was given"));
        assert!(html.contains("Perplexity 6.1234 ± 0.0456 on 4,088 tokens."));
        assert!(html.contains("(+1.0% perplexity)") && html.contains("--baseline BF16_DIR"));
        assert!(!html.contains("budget</span>"));

        let mut r = sample();
        r.perplexity = f64::NAN;
        let html = render_html(&r);
        assert!(html.contains("not judged</span>The change of perplexity could not be computed (model n/a"));
        assert!(html.contains("97.31%"));
        if let Some(c) = r.baseline.as_mut() {
            c.kld_mean = f64::NAN;
        }
        assert!(render_html(&r).contains("<span class=\"value\">n/a</span><span class=\"label\">KL divergence, mean"));
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
    fn renders_llama_cpp_figures_under_their_names() {
        let html = render_html(&sample());
        assert_well_formed(&html);
        for expected in [
            "perplexity --kl-divergence",
            // The percentile row, in llama.cpp's order.
            "<th class=\"num\">99.9%</th><th class=\"num\">99%</th><th class=\"num\">95%</th>",
            "<td class=\"num\">0.211</td><td class=\"num\">0.0356</td><td class=\"num\">0.0147</td>\
             <td class=\"num\">0.00873</td><td class=\"num\">0.00105</td><td class=\"num\">3.21e-5</td>\
             <td class=\"num\">8.76e-6</td><td class=\"num\">4.32e-7</td>",
            "<td>Mean KLD</td><td class=\"num\">0.00412 ± 1.23e-4 nats</td>",
            "<td class=\"num\">0.020364 ± 0.001234</td>",
            "<td class=\"num\">-0.123% ± 0.046%</td>",
            "<td>RMS Δp</td><td class=\"num\">2.345% ± 0.068%</td>",
            "<td>Same top p (top-1 agreement)</td><td class=\"num\">97.310% ± 0.253%</td>",
            "<td class=\"num\">99.52%</td>",
            "<td class=\"num\">90.18%</td>",
            // And in the table of every figure.
            "0.211 / 0.0356 / 0.0147 / 0.00873 / 0.00105 / 3.21e-5 / 8.76e-6 / 4.32e-7 nats",
            "-0.123% ± 0.046% / 2.345% ± 0.068%",
            "99.52% / 90.18%",
        ] {
            assert!(html.contains(expected), "missing {expected:?}");
        }
        let back = embedded(&html).baseline.expect("baseline survives");
        assert_eq!(back.kld_percentiles, llama_cpp_figures().kld_percentiles);
        assert!(close(back.ln_ppl_ratio_stderr, 0.001234) && close(back.top5_overlap, 0.9018));
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

    /// Writes sample pages to /tmp for a look in a browser:
    /// `cargo test -p fp8forge-runtime --lib -- --ignored write_sample_pages`.
    #[test]
    #[ignore = "writes pages to /tmp for a person to look at; asserts nothing"]
    fn write_sample_pages() {
        let pages = [
            ("/tmp/report_sample.html", sample()),
            ("/tmp/report_big.html", big(61, 256)),
            ("/tmp/report_no_baseline.html", without_baseline(3, 8)),
            ("/tmp/report_big_no_baseline.html", without_baseline(61, 256)),
        ];
        for (path, r) in pages {
            std::fs::write(path, render_html(&r)).expect("write sample page");
        }
    }
}
