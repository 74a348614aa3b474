//! The verdict at the top of the report: what the evaluated model (usually the FP8 conversion)
//! costs in perplexity against its baseline, and whether that is within the budget.

use super::format::relative_change_percent;
use crate::metrics::{ActivationQuant, EvalResult};

/// The most perplexity the evaluated model may cost over its baseline, in percent of the
/// baseline's, to be within budget: the project's goal for FP8 ("within 1% of BF16",
/// docs/BENCHMARKS.md).
pub(super) const PERPLEXITY_BUDGET_PERCENT: f64 = 1.0;

/// What the report concludes from the two perplexities.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Verdict {
    /// No baseline was evaluated, so there is nothing to compare with.
    NoBaseline,
    /// A baseline was evaluated, but a perplexity is not finite or the baseline's is zero.
    Unmeasured,
    /// The perplexity rose by at most the budget, or fell.
    Within {
        /// Change of the perplexity against the baseline's, in percent.
        change_percent: f64,
    },
    /// The perplexity rose by more than the budget.
    Over {
        /// Change of the perplexity against the baseline's, in percent.
        change_percent: f64,
    },
}

impl Verdict {
    /// The verdict on `r`.
    pub(super) fn of(r: &EvalResult) -> Self {
        let Some(c) = &r.baseline else {
            return Verdict::NoBaseline;
        };
        // Judged as shown (two decimals), so that a page never says "+1.00%, over the budget of +1.0%".
        let shown = |change: f64| (change * 100.0).round() / 100.0;
        match relative_change_percent(r.perplexity, c.baseline_perplexity) {
            None => Verdict::Unmeasured,
            Some(change_percent) if shown(change_percent) <= PERPLEXITY_BUDGET_PERCENT => {
                Verdict::Within { change_percent }
            }
            Some(change_percent) => Verdict::Over { change_percent },
        }
    }

    /// The verdict in two or three words, for the badge on the page.
    pub(super) fn badge(self) -> &'static str {
        match self {
            Verdict::NoBaseline => "no verdict",
            Verdict::Unmeasured => "not judged",
            Verdict::Within { .. } => "within budget",
            Verdict::Over { .. } => "over budget",
        }
    }

    /// The CSS class of the page's verdict box.
    pub(super) fn class(self) -> &'static str {
        match self {
            Verdict::NoBaseline | Verdict::Unmeasured => "verdict unknown",
            Verdict::Within { .. } => "verdict within",
            Verdict::Over { .. } => "verdict over",
        }
    }
}

/// What the verdict calls the evaluated model: "FP8" when its weights or activations are FP8,
/// "The model" otherwise.
pub(super) fn subject(r: &EvalResult) -> &'static str {
    let fp8 = |s: &str| s.trim_start().to_ascii_lowercase().starts_with("fp8");
    if fp8(&r.weights) || r.act_quant != ActivationQuant::None { "FP8" } else { "The model" }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Comparison;

    fn result(perplexity: f64, baseline_perplexity: Option<f64>) -> EvalResult {
        EvalResult {
            perplexity,
            baseline: baseline_perplexity.map(|b| Comparison { baseline_perplexity: b, ..Comparison::default() }),
            ..EvalResult::default()
        }
    }

    fn change(v: Verdict) -> Option<f64> {
        match v {
            Verdict::Within { change_percent } | Verdict::Over { change_percent } => Some(change_percent),
            Verdict::NoBaseline | Verdict::Unmeasured => None,
        }
    }

    #[test]
    fn within_budget_up_to_and_including_the_budget() {
        assert!(matches!(Verdict::of(&result(4.0702, Some(4.0664))), Verdict::Within { .. }));
        assert!(matches!(Verdict::of(&result(5.97, Some(6.0))), Verdict::Within { .. }));
        assert!(matches!(Verdict::of(&result(6.0, Some(6.0))), Verdict::Within { .. }));
        // +1% is computed as 1.0000000000000009%; judged as shown, "+1.00%", it is within.
        assert!(matches!(Verdict::of(&result(101.0, Some(100.0))), Verdict::Within { .. }));
        assert!(matches!(Verdict::of(&result(101.004, Some(100.0))), Verdict::Within { .. }));
        let v = Verdict::of(&result(4.0702, Some(4.0664)));
        assert!(change(v).is_some_and(|c| (c - 0.0934).abs() < 1e-3), "{v:?}");
    }

    #[test]
    fn over_budget_beyond_it() {
        let v = Verdict::of(&result(6.1234, Some(6.0)));
        assert!(matches!(v, Verdict::Over { .. }), "{v:?}");
        assert!(change(v).is_some_and(|c| (c - 2.0567).abs() < 1e-3), "{v:?}");
        assert!(matches!(Verdict::of(&result(101.01, Some(100.0))), Verdict::Over { .. }));
        assert_eq!(v.class(), "verdict over");
    }

    #[test]
    fn no_baseline_and_unmeasurable_changes() {
        assert_eq!(Verdict::of(&result(6.0, None)), Verdict::NoBaseline);
        assert_eq!(Verdict::of(&result(f64::NAN, Some(6.0))), Verdict::Unmeasured);
        assert_eq!(Verdict::of(&result(6.0, Some(f64::INFINITY))), Verdict::Unmeasured);
        assert_eq!(Verdict::of(&result(6.0, Some(0.0))), Verdict::Unmeasured);
        assert_eq!(Verdict::of(&EvalResult::default()), Verdict::NoBaseline);
        assert_eq!(Verdict::NoBaseline.class(), Verdict::Unmeasured.class());
    }

    #[test]
    fn subject_names_fp8_when_weights_or_activations_are() {
        let with = |weights: &str, act_quant: ActivationQuant| EvalResult {
            weights: weights.to_string(),
            act_quant,
            ..EvalResult::default()
        };
        assert_eq!(subject(&with("fp8 e4m3 (fp8, 128x128 blocks, f32 scales)", ActivationQuant::None)), "FP8");
        assert_eq!(subject(&with("bf16", ActivationQuant::Fp8)), "FP8");
        assert_eq!(subject(&with("bf16", ActivationQuant::None)), "The model");
    }
}
