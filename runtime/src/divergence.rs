//! How a model's next-token distributions differ from its baseline's, one scored position at a
//! time, and the summary over all of them: the figures llama.cpp's `perplexity --kl-divergence`
//! prints (KL divergence and its percentiles, ln(PPL(Q)/PPL(base)), Δp, "same top p"), with the
//! same definitions, plus top-5 agreement.
//!
//! Per position, P is the baseline's distribution and Q the model's; `p` and `q` are the
//! probabilities each gives the correct next token. Everything is computed in f64 from the f32
//! logits, streaming: a position is reduced to a [`PositionComparison`] and its logits are not kept.

use crate::metrics::{Comparison, Histogram, KldPercentiles};

/// How many of each model's most likely tokens top-5 agreement compares.
pub(crate) const TOP_K: usize = 5;

/// Log-probabilities of one row of logits: `ln softmax(logits)[i] = logits[i] − lse`.
#[derive(Clone, Copy)]
pub(crate) struct LogProbs<'a> {
    logits: &'a [f32],
    lse: f64,
}

impl<'a> LogProbs<'a> {
    /// The row with its log-sum-exp, computed once by the caller.
    pub(crate) fn new(logits: &'a [f32], lse: f64) -> Self {
        LogProbs { logits, lse }
    }

    /// `ln P(token)`.
    fn at(&self, token: usize) -> f64 {
        self.logits[token] as f64 - self.lse
    }
}

/// The `TOP_K` most likely token ids of a row (all of them when the row is shorter), most likely
/// first; of equal logits the lower id ranks first, as `argmax` picks the first maximum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TopK {
    ids: [usize; TOP_K],
    len: usize,
}

impl TopK {
    /// One pass over `row`, keeping the best `TOP_K` by insertion.
    pub(crate) fn of(row: &[f32]) -> Self {
        let mut ids = [0usize; TOP_K];
        let mut vals = [f32::NEG_INFINITY; TOP_K];
        let mut len = 0;
        for (i, &x) in row.iter().enumerate() {
            if len == TOP_K && x <= vals[TOP_K - 1] {
                continue;
            }
            // Start at the first free slot, or at the last one (whose entry drops out), and move up
            // past every strictly smaller value: an equal earlier value stays ahead.
            let mut j = len.min(TOP_K - 1);
            while j > 0 && x > vals[j - 1] {
                vals[j] = vals[j - 1];
                ids[j] = ids[j - 1];
                j -= 1;
            }
            vals[j] = x;
            ids[j] = i;
            len = (len + 1).min(TOP_K);
        }
        TopK { ids, len }
    }

    /// The ids, most likely first.
    pub(crate) fn ids(&self) -> &[usize] {
        &self.ids[..self.len]
    }
}

/// What one scored position contributes to the comparison.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct PositionComparison {
    /// `−ln p`, the baseline's negative log-likelihood of the correct token.
    pub(crate) base_nll: f64,
    /// KL(P ‖ Q) in nats, clamped at 0 (a negative value is rounding).
    pub(crate) kld: f64,
    /// Both models' most likely token is the same ("same top p").
    pub(crate) same_top1: bool,
    /// The baseline's most likely token is among the model's `TOP_K` most likely.
    pub(crate) base_top1_in_top_k: bool,
    /// `|topK(P) ∩ topK(Q)| / K`, K = `TOP_K` or the vocabulary when smaller.
    pub(crate) top_k_overlap: f64,
}

/// Compares the baseline's and the model's distributions at one position whose correct next
/// token is `target`.
pub(crate) fn compare_position(base: LogProbs<'_>, model: LogProbs<'_>, target: usize) -> PositionComparison {
    let mut kl = 0f64;
    for (&x, &y) in base.logits.iter().zip(model.logits) {
        let lp = x as f64 - base.lse;
        let lq = y as f64 - model.lse;
        kl += lp.exp() * (lp - lq);
    }
    let (tp, tq) = (TopK::of(base.logits), TopK::of(model.logits));
    let (bp, bq) = (tp.ids(), tq.ids());
    let shared = bp.iter().filter(|id| bq.contains(id)).count();
    PositionComparison {
        base_nll: -base.at(target),
        kld: kl.max(0.0),
        same_top1: bp.first() == bq.first(),
        base_top1_in_top_k: bp.first().is_some_and(|id| bq.contains(id)),
        top_k_overlap: shared as f64 / bp.len().max(1) as f64,
    }
}

/// The comparison's running state: per-token values where a percentile or a paired difference
/// needs them, counts otherwise.
#[derive(Default)]
pub(crate) struct DivergenceAcc {
    base_nll: Vec<f64>,
    kld: Vec<f64>,
    same_top1: u64,
    base_top1_in_top_k: u64,
    top_k_overlap: f64,
}

impl DivergenceAcc {
    /// Adds one position.
    pub(crate) fn push(&mut self, c: PositionComparison) {
        self.base_nll.push(c.base_nll);
        self.kld.push(c.kld);
        self.same_top1 += u64::from(c.same_top1);
        self.base_top1_in_top_k += u64::from(c.base_top1_in_top_k);
        self.top_k_overlap += c.top_k_overlap;
    }

    /// The token-level figures of the comparison; `nll` holds the model's negative
    /// log-likelihoods of the same positions, in the same order. The baseline's path, routing
    /// agreement and tensor errors are left for the caller.
    pub(crate) fn finish(self, nll: &[f64]) -> Comparison {
        let n = self.kld.len();
        let share = |count: f64| count / n.max(1) as f64;
        let (bmean, bse) = mean_stderr(&self.base_nll);
        let (kld_mean, kld_mean_stderr) = mean_stderr(&self.kld);
        let mut sorted = self.kld;
        sorted.sort_by(f64::total_cmp);
        let top1 = share(self.same_top1 as f64);
        let ratio: Vec<f64> = nll.iter().zip(&self.base_nll).map(|(q, p)| q - p).collect();
        let (ln_ppl_ratio, ln_ppl_ratio_stderr) = mean_stderr(&ratio);
        let dp = DeltaP::of(nll, &self.base_nll);
        Comparison {
            baseline_perplexity: bmean.exp(),
            baseline_perplexity_stderr: bmean.exp() * bse,
            baseline_nll_mean: bmean,
            kld_mean,
            kld_mean_stderr,
            kld_p99: percentile(&sorted, 0.99),
            kld_max: sorted.last().copied().unwrap_or(0.0),
            kld_percentiles: kld_percentiles(&sorted),
            kld_histogram: log_histogram(&sorted),
            ln_ppl_ratio,
            ln_ppl_ratio_stderr,
            delta_p_mean: dp.mean,
            delta_p_mean_stderr: dp.mean_stderr,
            delta_p_rms: dp.rms,
            delta_p_rms_stderr: dp.rms_stderr,
            top1_agreement: top1,
            top1_agreement_stderr: share_stderr(top1, n),
            top5_agreement: share(self.base_top1_in_top_k as f64),
            top5_overlap: share(self.top_k_overlap),
            ..Comparison::default()
        }
    }
}

/// Δp = q − p per position, summarized as llama.cpp does: mean and RMS, each with its standard
/// error (the RMS's by the delta method from the standard error of the mean of Δp²).
struct DeltaP {
    mean: f64,
    mean_stderr: f64,
    rms: f64,
    rms_stderr: f64,
}

impl DeltaP {
    /// From the model's and the baseline's negative log-likelihoods of the same positions.
    fn of(nll: &[f64], base_nll: &[f64]) -> Self {
        let dp: Vec<f64> = nll.iter().zip(base_nll).map(|(q, p)| (-q).exp() - (-p).exp()).collect();
        let squares: Vec<f64> = dp.iter().map(|d| d * d).collect();
        let (ms, ms_stderr) = mean_stderr(&squares);
        let (mean, mean_se) = mean_stderr(&dp);
        let rms = ms.sqrt();
        // d√x = dx / (2√x); at x = 0 every Δp is 0 and so is the error.
        let rms_stderr = if rms > 0.0 { ms_stderr / (2.0 * rms) } else { 0.0 };
        DeltaP { mean, mean_stderr: mean_se, rms, rms_stderr }
    }
}

/// Mean and standard error of the mean (sample standard deviation / √n).
pub(crate) fn mean_stderr(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, 0.0);
    }
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// The standard error of a share `s` of `n` trials, `√(s(1 − s)/(n − 1))`, as llama.cpp gives it
/// for "same top p" (0 below two trials).
fn share_stderr(s: f64, n: usize) -> f64 {
    if n < 2 { 0.0 } else { (s * (1.0 - s) / (n - 1) as f64).max(0.0).sqrt() }
}

/// The `q` quantile of sorted values as llama.cpp computes it: linear interpolation between the
/// values at ranks ⌊q(n − 1)⌋ and the next (so `q = 0.5` is the median, the mean of the middle
/// two for even `n`); 0 for no values.
pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    let Some(&last) = sorted.last() else { return 0.0 };
    if q <= 0.0 {
        return sorted[0];
    }
    if q >= 1.0 {
        return last;
    }
    let rank = q * (sorted.len() - 1) as f64;
    let i = rank.floor() as usize;
    let frac = rank - i as f64;
    let next = sorted[(i + 1).min(sorted.len() - 1)];
    (1.0 - frac) * sorted[i] + frac * next
}

/// The percentiles llama.cpp prints of sorted per-token KL divergences.
fn kld_percentiles(sorted: &[f64]) -> KldPercentiles {
    let p = |percent: f64| percentile(sorted, percent / 100.0);
    KldPercentiles {
        p99_9: p(99.9),
        p99: p(99.0),
        p95: p(95.0),
        p90: p(90.0),
        p50: p(50.0),
        p10: p(10.0),
        p5: p(5.0),
        p1: p(1.0),
    }
}

/// A histogram of positive values over log-spaced bins: 4 per decade from 1e-8 to 10.
pub(crate) fn log_histogram(sorted: &[f64]) -> Histogram {
    let edges: Vec<f64> = (0..=36).map(|i| 10f64.powf(-8.0 + i as f64 / 4.0)).collect();
    let mut counts = vec![0u64; edges.len() - 1];
    for &x in sorted {
        let i = edges.partition_point(|&e| e <= x).saturating_sub(1).min(counts.len() - 1);
        counts[i] += 1;
    }
    Histogram { edges, counts }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: f64, want: f64, tol: f64) -> bool {
        (got - want).abs() <= tol
    }

    /// Compares two rows of logits at `target`, computing the log-sum-exps as `eval` does.
    fn compare(base: &[f32], model: &[f32], target: usize) -> PositionComparison {
        let lp = LogProbs::new(base, crate::ops::log_sum_exp(base));
        let lq = LogProbs::new(model, crate::ops::log_sum_exp(model));
        compare_position(lp, lq, target)
    }

    #[test]
    fn kl_divergence_is_base_to_model_on_two_tokens() {
        // P = (1/2, 1/2); Q = (3/4, 1/4). KL(P‖Q) = ½ln(½ / ¾) + ½ln(½ / ¼) = ½ln(4/3) ≈ 0.143841,
        // where the reverse direction KL(Q‖P) would be ≈ 0.130812.
        let c = compare(&[0.0, 0.0], &[3f32.ln(), 0.0], 1);
        assert!(close(c.kld, 0.5 * (4.0f64 / 3.0).ln(), 1e-7), "KL {}", c.kld);
        assert!(close(c.base_nll, 2f64.ln(), 1e-12), "baseline NLL {}", c.base_nll);
        // Equal logits: token 0 is the baseline's most likely, as the model's.
        assert!(c.same_top1 && c.base_top1_in_top_k);
        assert_eq!(c.top_k_overlap, 1.0, "a vocabulary of 2 is both top-2s whole");
    }

    #[test]
    fn identical_rows_compare_as_exactly_equal() {
        let row = [0.5f32, -1.25, 3.0, 2.0, 0.0, 1.0, -7.5];
        let c = compare(&row, &row, 4);
        assert_eq!(c.kld, 0.0);
        assert!(c.same_top1 && c.base_top1_in_top_k);
        assert_eq!(c.top_k_overlap, 1.0);
    }

    #[test]
    fn top_k_ranks_by_logit_with_ties_to_the_lower_id() {
        assert_eq!(TopK::of(&[1.0, 5.0, 3.0, 5.0, 0.0, 2.0, 4.0]).ids(), &[1, 3, 6, 2, 5]);
        assert_eq!(TopK::of(&[2.0, 2.0, 2.0, 2.0, 2.0, 2.0]).ids(), &[0, 1, 2, 3, 4]);
        assert_eq!(TopK::of(&[0.0, 9.0, 1.0]).ids(), &[1, 2, 0], "short rows rank whole");
        assert_eq!(TopK::of(&[-3.0, -1.0, -2.0, -8.0, -9.0, -0.5, -4.0]).ids(), &[5, 1, 2, 0, 6]);
    }

    #[test]
    fn top5_agreement_and_overlap_on_hand_ranked_rows() {
        let base = [7.0f32, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]; // top-5 {0,1,2,3,4}, top-1 0
        // Model top-5 {6,1,2,3,4}: top-1 6, the baseline's 0 is out, 4 of 5 shared.
        let c = compare(&base, &[0.0, 6.0, 5.0, 4.0, 3.0, 2.0, 7.0], 0);
        assert!(!c.same_top1 && !c.base_top1_in_top_k);
        assert!(close(c.top_k_overlap, 0.8, 1e-15), "overlap {}", c.top_k_overlap);
        // Model top-5 {1,0,6,2,3} (2 and 3 win the tie at 1.0 over 4 and 5): 0 is in, 4 of 5 shared.
        let c = compare(&base, &[6.0, 7.0, 1.0, 1.0, 1.0, 1.0, 5.0], 0);
        assert!(!c.same_top1 && c.base_top1_in_top_k);
        assert!(close(c.top_k_overlap, 0.8, 1e-15), "overlap {}", c.top_k_overlap);
    }

    /// Three positions with p = (1/2, 1/4, 1/2), q = (1/4, 1/2, 1/8).
    fn three_positions() -> (DivergenceAcc, Vec<f64>) {
        let ln2 = 2f64.ln();
        let mut acc = DivergenceAcc::default();
        let rows = [(ln2, 0.3, true, true, 1.0), (2.0 * ln2, 0.0, false, true, 0.8), (ln2, 0.1, true, false, 0.4)];
        for (base_nll, kld, same_top1, base_top1_in_top_k, top_k_overlap) in rows {
            acc.push(PositionComparison { base_nll, kld, same_top1, base_top1_in_top_k, top_k_overlap });
        }
        (acc, vec![2.0 * ln2, ln2, 3.0 * ln2])
    }

    #[test]
    fn summary_of_three_positions_matches_hand_computed_values() {
        let (acc, nll) = three_positions();
        let c = acc.finish(&nll);
        let ln2 = 2f64.ln();
        let checks = [
            // Baseline NLL mean 4ln2/3, so its perplexity is 2^(4/3).
            ("baseline_perplexity", c.baseline_perplexity, 2f64.powf(4.0 / 3.0)),
            // nll_q − nll_p = (ln2, −ln2, 2ln2): mean 2ln2/3, sample variance 7ln²2/3, so the
            // standard error is ln2·√7/3.
            ("ln_ppl_ratio", c.ln_ppl_ratio, 2.0 * ln2 / 3.0),
            ("ln_ppl_ratio_stderr", c.ln_ppl_ratio_stderr, ln2 * 7f64.sqrt() / 3.0),
            // Δp = (−1/4, 1/4, −3/8): mean −1/8; deviations (−1/8, 3/8, −1/4), variance 7/64.
            ("delta_p_mean", c.delta_p_mean, -0.125),
            ("delta_p_mean_stderr", c.delta_p_mean_stderr, (7.0f64 / 64.0 / 3.0).sqrt()),
            // Δp² = (1/16, 1/16, 9/64): mean 17/192, RMS √(17/192); the standard error of the mean
            // of Δp² is 5/192 (deviations −5/192, −5/192, 10/192), so that of the RMS is
            // (5/192) / (2√(17/192)).
            ("delta_p_rms", c.delta_p_rms, (17.0f64 / 192.0).sqrt()),
            ("delta_p_rms_stderr", c.delta_p_rms_stderr, 5.0 / 192.0 / (2.0 * (17.0f64 / 192.0).sqrt())),
            // KLD (0.3, 0, 0.1): mean 2/15; deviations (1/6, −2/15, −1/30), variance 7/300.
            ("kld_mean", c.kld_mean, 2.0 / 15.0),
            ("kld_mean_stderr", c.kld_mean_stderr, (7.0f64 / 300.0 / 3.0).sqrt()),
            ("kld_max", c.kld_max, 0.3),
            // Sorted (0, 0.1, 0.3): rank q·2, interpolated.
            ("kld_p99", c.kld_p99, 0.1 + 0.98 * 0.2),
            ("p99.9", c.kld_percentiles.p99_9, 0.1 + 0.998 * 0.2),
            ("p99", c.kld_percentiles.p99, 0.1 + 0.98 * 0.2),
            ("p95", c.kld_percentiles.p95, 0.1 + 0.9 * 0.2),
            ("p90", c.kld_percentiles.p90, 0.1 + 0.8 * 0.2),
            ("p50", c.kld_percentiles.p50, 0.1),
            ("p10", c.kld_percentiles.p10, 0.2 * 0.1),
            ("p5", c.kld_percentiles.p5, 0.1 * 0.1),
            ("p1", c.kld_percentiles.p1, 0.02 * 0.1),
            // Same top-1 at 2 of 3: √((2/3)(1/3)/2) = 1/3.
            ("top1_agreement", c.top1_agreement, 2.0 / 3.0),
            ("top1_agreement_stderr", c.top1_agreement_stderr, 1.0 / 3.0),
            ("top5_agreement", c.top5_agreement, 2.0 / 3.0),
            ("top5_overlap", c.top5_overlap, 2.2 / 3.0),
        ];
        for (name, got, want) in checks {
            assert!(close(got, want, 1e-12), "{name}: {got}, expected {want}");
        }
        let nll_mean = nll.iter().sum::<f64>() / 3.0;
        assert!(close(c.ln_ppl_ratio, nll_mean - c.baseline_nll_mean, 1e-15), "ln ratio != difference of means");
    }

    #[test]
    fn equal_models_summarize_to_zero_change() {
        let mut acc = DivergenceAcc::default();
        let nll = [0.5, 1.5, 2.0];
        for &base_nll in &nll {
            acc.push(PositionComparison {
                base_nll,
                kld: 0.0,
                same_top1: true,
                base_top1_in_top_k: true,
                top_k_overlap: 1.0,
            });
        }
        let c = acc.finish(&nll);
        for (name, x) in [
            ("ln_ppl_ratio", c.ln_ppl_ratio),
            ("ln_ppl_ratio_stderr", c.ln_ppl_ratio_stderr),
            ("delta_p_mean", c.delta_p_mean),
            ("delta_p_rms", c.delta_p_rms),
            ("delta_p_rms_stderr", c.delta_p_rms_stderr),
            ("top1_agreement_stderr", c.top1_agreement_stderr),
        ] {
            assert_eq!(x, 0.0, "{name}");
        }
        assert!(c.kld_percentiles.levels().iter().all(|&(_, v)| v == 0.0));
        assert_eq!((c.top1_agreement, c.top5_agreement, c.top5_overlap), (1.0, 1.0, 1.0));
    }

    #[test]
    fn stats_helpers_on_hand_worked_values() {
        let (m, se) = mean_stderr(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        assert!((se - (5.0f64 / 3.0 / 4.0).sqrt()).abs() < 1e-12);
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        // Rank 0.99 · 99 = 98.01: between 99 and 100.
        assert!(close(percentile(&s, 0.99), 99.01, 1e-12), "{}", percentile(&s, 0.99));
        assert_eq!(percentile(&s, 0.5), 50.5, "the median of an even count is the mean of the middle two");
        assert_eq!(percentile(&s, 1.0), 100.0);
        assert_eq!(percentile(&s, 0.0), 1.0);
        assert_eq!(percentile(&[4.0], 0.9), 4.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
        let h = log_histogram(&[0.0, 1e-9, 1e-3, 0.5, 100.0]);
        assert_eq!(h.counts.iter().sum::<u64>(), 5);
        assert_eq!(h.counts[0], 2);
        assert_eq!(*h.counts.last().unwrap_or(&0), 1);
        assert_eq!(h.counts[20], 1); // [1e-3, 10^-2.75)
    }
}
