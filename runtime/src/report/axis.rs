//! Axes of the report's plots: linear axes with ticks at 1, 2 or 5 times a power of ten, index
//! axes (layer, expert, rank), and base-10 logarithmic axes for values that span decades. Pure
//! arithmetic, no drawing: [`super::svg`] draws what this computes.

/// Values spanning more than this ratio (two decades) get a logarithmic axis.
const LOG_AXIS_MIN_RATIO: f64 = 100.0;

/// Linear or logarithmic (base 10) mapping of an axis.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Scale {
    /// Equal steps of value are equal distances.
    Linear,
    /// Equal ratios of value are equal distances.
    Log,
}

/// An axis: its range and its ticks with their labels.
#[derive(Clone, Debug)]
pub(super) struct Axis {
    /// How values map to positions.
    pub(super) scale: Scale,
    /// The value at the start of the axis.
    pub(super) lo: f64,
    /// The value at its end.
    pub(super) hi: f64,
    /// Tick values with their labels, increasing.
    pub(super) ticks: Vec<(f64, String)>,
}

impl Axis {
    /// Where `v` lies on the axis, from 0 (at `lo`) to 1 (at `hi`), clamped; 0 when not finite.
    pub(super) fn fraction(&self, v: f64) -> f64 {
        let f = match self.scale {
            Scale::Linear => (v - self.lo) / (self.hi - self.lo),
            Scale::Log => (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10()),
        };
        if f.is_finite() { f.clamp(0.0, 1.0) } else { 0.0 }
    }
}

/// `(min, max)` of the finite values, `None` when there is none.
pub(super) fn finite_min_max(values: &[f64]) -> Option<(f64, f64)> {
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
pub(super) fn nice_linear_axis(min: f64, max: f64, target: usize) -> Axis {
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
pub(super) fn index_axis(min: f64, max: f64, target: usize) -> Axis {
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
pub(super) fn log_axis(min: f64, max: f64) -> Axis {
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
pub(super) fn value_axis(values: &[f64], from_zero: bool) -> Axis {
    let Some((min, max)) = finite_min_max(values) else {
        return nice_linear_axis(0.0, 1.0, 5);
    };
    if min > 0.0 && max / min > LOG_AXIS_MIN_RATIO {
        return log_axis(min, max);
    }
    let start = if from_zero || (min > 0.0 && min < (max - min)) { min.min(0.0) } else { min };
    nice_linear_axis(start, max, 5)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(axis: &Axis) -> Vec<&str> {
        axis.ticks.iter().map(|t| t.1.as_str()).collect()
    }

    #[test]
    fn linear_ticks_are_nice() {
        let axis = nice_linear_axis(0.0, 7.3, 4);
        let values: Vec<f64> = axis.ticks.iter().map(|t| t.0).collect();
        assert_eq!(values, vec![0.0, 2.0, 4.0, 6.0, 8.0]);
        assert_eq!((axis.lo, axis.hi), (0.0, 8.0));
        let axis = nice_linear_axis(0.0, 0.0372, 5);
        assert_eq!(labels(&axis), vec!["0", "0.01", "0.02", "0.03", "0.04"]);
        let axis = nice_linear_axis(0.0, 41_000.0, 4);
        assert_eq!(labels(&axis), vec!["0", "10k", "20k", "30k", "40k", "50k"]);
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
        assert_eq!(labels(&axis), vec!["1e-5", "1e-4", "0.001", "0.01", "0.1", "1"]);
        assert_eq!(axis.scale, Scale::Log);
        let axis = log_axis(0.012, 0.3);
        assert_eq!(labels(&axis), vec!["0.01", "0.02", "0.05", "0.1", "0.2", "0.5", "1"]);
        assert!((axis.fraction(0.1) - 0.5).abs() < 1e-12);
        assert_eq!(axis.fraction(f64::NAN), 0.0);
        let axis = log_axis(1e-12, 1e12);
        assert_eq!(labels(&axis), vec!["1e-12", "1e-9", "1e-6", "0.001", "1", "1000", "1e6", "1e9", "1e12"]);
        assert_eq!(value_axis(&[0.001, 0.5], false).scale, Scale::Log);
        assert_eq!(value_axis(&[0.01, 0.5], false).scale, Scale::Linear);
    }
}
