//! Quantization error statistics: sums of squares and the largest absolute error, mergeable
//! across threads, from which the relative RMS error and the SNR follow.

/// Error of an approximation against a reference, accumulated element by element.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct ErrorStats {
    /// Number of elements compared.
    pub numel: u64,
    /// Sum of the squared reference values.
    pub sum_sq_ref: f64,
    /// Sum of the squared errors (approximation minus reference).
    pub sum_sq_err: f64,
    /// Largest absolute error.
    pub max_abs_err: f64,
}

impl ErrorStats {
    /// Adds one element: `reference` and its approximation `approx`.
    #[inline]
    pub fn accumulate(&mut self, reference: f32, approx: f32) {
        let r = f64::from(reference);
        let e = f64::from(approx) - r;
        self.numel += 1;
        self.sum_sq_ref += r * r;
        self.sum_sq_err += e * e;
        self.max_abs_err = self.max_abs_err.max(e.abs());
    }

    /// Adds the elements counted in `other`.
    pub fn merge(&mut self, other: &ErrorStats) {
        self.numel += other.numel;
        self.sum_sq_ref += other.sum_sq_ref;
        self.sum_sq_err += other.sum_sq_err;
        self.max_abs_err = self.max_abs_err.max(other.max_abs_err);
    }

    /// Relative RMS error, `sqrt(sum_sq_err / sum_sq_ref)`; 0 when both sums are 0 (an all-zero
    /// reference reproduced exactly), +Inf when only the reference is all zero.
    pub fn rel_rms(&self) -> f64 {
        if self.sum_sq_err == 0.0 { 0.0 } else { (self.sum_sq_err / self.sum_sq_ref).sqrt() }
    }

    /// Signal-to-noise ratio in dB, `10 · log10(sum_sq_ref / sum_sq_err)`; `None` when the error
    /// is exactly zero (infinite SNR).
    pub fn snr_db(&self) -> Option<f64> {
        if self.sum_sq_err == 0.0 { None } else { Some(10.0 * (self.sum_sq_ref / self.sum_sq_err).log10()) }
    }

    /// Largest absolute error.
    pub fn max_abs(&self) -> f64 {
        self.max_abs_err
    }
}

/// Statistics of `approx` against `reference`, element by element over the common length
/// (the two slices should have the same length).
pub fn compare(reference: &[f32], approx: &[f32]) -> ErrorStats {
    debug_assert_eq!(reference.len(), approx.len());
    let mut s = ErrorStats::default();
    for (&r, &a) in reference.iter().zip(approx) {
        s.accumulate(r, a);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_approximation_has_zero_error_and_no_snr() {
        let x = [1.0f32, -2.0, 0.5];
        let s = compare(&x, &x);
        assert_eq!(s.numel, 3);
        assert_eq!(s.sum_sq_ref, 5.25);
        assert_eq!(s.rel_rms(), 0.0);
        assert_eq!(s.snr_db(), None);
        assert_eq!(s.max_abs(), 0.0);
        assert_eq!(compare(&[0.0; 4], &[0.0; 4]).rel_rms(), 0.0, "all-zero reference reproduced");
    }

    #[test]
    fn known_error_gives_known_rel_rms_snr_and_max() {
        // Reference energy 4·1 = 4, error energy 4·0.01 = 0.04: rel_rms 0.1, SNR 20 dB.
        let r = [1.0f32, -1.0, 1.0, -1.0];
        let a = [1.1f32, -0.9, 0.9, -1.1];
        let s = compare(&r, &a);
        assert!((s.rel_rms() - 0.1).abs() < 1e-6, "rel_rms {}", s.rel_rms());
        assert!(s.snr_db().is_some_and(|d| (d - 20.0).abs() < 1e-4), "snr {:?}", s.snr_db());
        assert!((s.max_abs() - 0.1).abs() < 1e-6, "max {}", s.max_abs());
    }

    #[test]
    fn merge_of_halves_equals_whole() {
        let r: Vec<f32> = (0..100).map(|i| i as f32 * 0.25 - 10.0).collect();
        let a: Vec<f32> = r.iter().map(|x| x + 0.125).collect();
        let mut m = compare(&r[..37], &a[..37]);
        m.merge(&compare(&r[37..], &a[37..]));
        let w = compare(&r, &a);
        assert_eq!(m.numel, w.numel);
        assert_eq!(m.max_abs_err, w.max_abs_err);
        assert!((m.sum_sq_ref - w.sum_sq_ref).abs() <= 1e-9 * w.sum_sq_ref);
        assert!((m.sum_sq_err - w.sum_sq_err).abs() <= 1e-9 * w.sum_sq_err);
    }
}
