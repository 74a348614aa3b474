//! Numbers as the report writes them: fixed and significant digits, shares, counts, shapes. Every
//! function writes "n/a" for a value that is not finite, so no NaN or inf reaches the page.

/// `x` with `decimals` decimals, or "n/a" when it is not finite.
pub(super) fn fmt_fixed(x: f64, decimals: usize) -> String {
    if x.is_finite() { format!("{:.*}", decimals, x + 0.0) } else { "n/a".to_string() }
}

/// `x` with `sig` significant digits: fixed notation from 0.001 to 10⁴, scientific outside.
pub(super) fn fmt_sig(x: f64, sig: usize) -> String {
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
pub(super) fn fmt_plus_minus(value: f64, stderr: f64) -> String {
    format!("{} ± {}", fmt_fixed(value, 4), fmt_fixed(stderr, 4))
}

/// The change of `value` relative to `reference`, in percent; `None` unless both are finite and
/// `reference` is not zero.
pub(super) fn relative_change_percent(value: f64, reference: f64) -> Option<f64> {
    let change = (value / reference - 1.0) * 100.0;
    (value.is_finite() && reference.is_finite() && reference != 0.0).then_some(change + 0.0)
}

/// The change of `value` relative to `reference` in percent with two decimals and its sign.
pub(super) fn fmt_relative_change(value: f64, reference: f64) -> String {
    match relative_change_percent(value, reference) {
        Some(change) => format!("{change:+.2}%"),
        None => "n/a".to_string(),
    }
}

/// A share in `[0, 1]` as a percentage with two decimals.
pub(super) fn fmt_percent(share: f64) -> String {
    if share.is_finite() { format!("{:.2}%", share * 100.0) } else { "n/a".to_string() }
}

/// A share and its standard error as percentages with three decimals, as llama.cpp prints Δp
/// and "same top p": `-0.123% ± 0.045%`.
pub(super) fn fmt_percent_plus_minus(share: f64, stderr: f64) -> String {
    let pct = |x: f64| if x.is_finite() { format!("{:.3}%", x * 100.0 + 0.0) } else { "n/a".to_string() };
    format!("{} ± {}", pct(share), pct(stderr))
}

/// A count with thousands separators.
pub(super) fn fmt_count(n: usize) -> String {
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
pub(super) fn fmt_shape(shape: &[usize]) -> String {
    shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("×")
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(fmt_percent_plus_minus(-0.001234, 0.00045), "-0.123% ± 0.045%");
        assert_eq!(fmt_percent_plus_minus(f64::NAN, 0.0), "n/a ± 0.000%");
    }

    #[test]
    fn relative_change_is_none_when_not_finite() {
        assert_eq!(relative_change_percent(6.06, 6.0).map(|c| (c * 100.0).round()), Some(100.0));
        assert_eq!(relative_change_percent(f64::NAN, 6.0), None);
        assert_eq!(relative_change_percent(6.0, f64::INFINITY), None);
        assert_eq!(relative_change_percent(0.0, 0.0), None);
        assert_eq!(relative_change_percent(6.0, 6.0), Some(0.0));
    }
}
