//! Adaptive prior inflation from the innovation statistics (`filter.adaptive_inflation`).
//!
//! For a consistent ensemble the innovation `d = y − h̄` of the forecast mean satisfies
//! `E‖d‖² = tr(H P Hᵀ) + tr R`. When the forecast spread is too small the innovations are larger
//! than that, and the factor `γ` that restores the balance for `P → γ² P` is
//!
//! ```text
//!   γ² = (‖y − h̄‖² − m σ_y²) / Σ_q var(h(x)_q),
//! ```
//!
//! with the observation-space variances taken from the ensemble (the estimate of Wang & Bishop
//! and of Li, Kalnay & Miyoshi). One cycle's estimate is noisy, so it is used only to inflate
//! (`γ ≥ 1`) and limited to the configured maximum per cycle: a cold start, whose spread is far
//! below its error, is inflated for a few cycles until the spread matches the innovations, and a
//! filter in balance is left alone.

/// The inflation factor `γ ∈ [1, max]` of the module documentation, from the mean (`mean_h`) and
/// unbiased variance (`var_h`) over the members of the observed forecast, the observation `y`
/// and the noise std. A non-finite estimate (a non-finite observation, which the guidance then
/// reports) leaves the ensemble as it is.
pub fn innovation_factor(
    mean_h: &[f32],
    var_h: &[f32],
    y: &[f32],
    noise_std: f32,
    max: f32,
) -> f32 {
    factor_from_sums(innovation_sums(mean_h, var_h, y), noise_std, max)
}

/// The sums the factor needs, `[‖y − h̄‖², Σ_q var h_q, m]`: additive over disjoint sets of
/// observations, so a sharded run sums them over its ranks before [`factor_from_sums`].
pub fn innovation_sums(mean_h: &[f32], var_h: &[f32], y: &[f32]) -> [f64; 3] {
    let innovation: f64 = y
        .iter()
        .zip(mean_h)
        .map(|(y, h)| (*y as f64 - *h as f64).powi(2))
        .sum();
    let spread: f64 = var_h.iter().map(|v| v.max(0.0) as f64).sum();
    [innovation, spread, y.len() as f64]
}

/// The factor from the (summed) [`innovation_sums`].
pub fn factor_from_sums(sums: [f64; 3], noise_std: f32, max: f32) -> f32 {
    let [innovation, spread, m] = sums;
    if max <= 1.0 || m <= 0.0 {
        return 1.0;
    }
    let excess = innovation - m * (noise_std as f64).powi(2);
    if !excess.is_finite() || !spread.is_finite() {
        return 1.0;
    }
    if excess <= spread {
        return 1.0;
    }
    if spread <= 0.0 {
        return max;
    }
    ((excess / spread).sqrt() as f32).clamp(1.0, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_innovations_leave_the_ensemble_alone() {
        // ‖d‖² = m(var + σ²): γ = 1.
        let (m, var, sigma) = (50usize, 0.04f32, 0.1f32);
        let d = (var + sigma * sigma).sqrt();
        let y: Vec<f32> = (0..m).map(|q| if q % 2 == 0 { d } else { -d }).collect();
        let g = innovation_factor(&vec![0.0; m], &vec![var; m], &y, sigma, 2.0);
        assert!((g - 1.0).abs() < 1e-5, "{g}");
    }

    #[test]
    fn under_dispersed_forecast_is_inflated_by_the_missing_ratio_up_to_the_cap() {
        // Innovation variance 4·var + σ²: γ = 2 exactly, and the cap limits it.
        let (m, var, sigma) = (40usize, 0.09f32, 0.05f32);
        let d = (4.0 * var + sigma * sigma).sqrt();
        let y: Vec<f32> = (0..m).map(|q| if q % 3 == 0 { -d } else { d }).collect();
        let mean = vec![0.0; m];
        let g = innovation_factor(&mean, &vec![var; m], &y, sigma, 3.0);
        assert!((g - 2.0).abs() < 1e-4, "{g}");
        assert_eq!(innovation_factor(&mean, &vec![var; m], &y, sigma, 1.3), 1.3);
        assert_eq!(innovation_factor(&mean, &vec![var; m], &y, sigma, 1.0), 1.0);
        // A collapsed ensemble with a real innovation gets the cap.
        assert_eq!(innovation_factor(&mean, &vec![0.0; m], &y, sigma, 1.5), 1.5);
    }

    #[test]
    fn over_dispersed_or_non_finite_gives_one() {
        let y = vec![0.01f32; 10];
        assert_eq!(innovation_factor(&[0.0; 10], &[1.0; 10], &y, 0.1, 2.0), 1.0);
        let mut bad = y.clone();
        bad[3] = f32::NAN;
        assert_eq!(
            innovation_factor(&[0.0; 10], &[1e-4; 10], &bad, 0.1, 2.0),
            1.0
        );
    }
}
