//! Gaspari–Cohn localization (ENFF_SPEC §6.3), with DAPPER's convention that the support
//! half-width is `1.82 · radius`.

/// The Gaspari–Cohn taper at distance `dist` for localization radius `radius` (> 0):
/// 1 at distance 0, 0 beyond `2 · 1.82 · radius`, clamped to `[0, 1]`.
pub fn gaspari_cohn(dist: f64, radius: f64) -> f64 {
    let z = dist.abs() / (1.82 * radius);
    let v = if z < 1.0 {
        1.0 - 5.0 / 3.0 * z.powi(2) + 5.0 / 8.0 * z.powi(3) + 0.5 * z.powi(4) - 0.25 * z.powi(5)
    } else if z < 2.0 {
        z.powi(5) / 12.0 - 0.5 * z.powi(4) + 5.0 / 8.0 * z.powi(3) + 5.0 / 3.0 * z.powi(2) - 5.0 * z
            + 4.0
            - 2.0 / (3.0 * z)
    } else {
        0.0
    };
    v.clamp(0.0, 1.0)
}

/// Distance between indices `i` and `j` on a periodic 1-D ring of length `len`.
pub fn ring_distance(i: usize, j: usize, len: usize) -> usize {
    let a = i.abs_diff(j);
    a.min(len - a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaspari_cohn_matches_golden_values_g5() {
        // ENFF_SPEC §6.3 / §10.3 G5: radius 2, distances 0..8.
        let want = [
            1.0,
            0.8896261,
            0.6335644,
            0.3534188,
            0.1452626,
            0.03860692,
            0.004262374,
            1.068788e-05,
            0.0,
        ];
        for (k, w) in want.iter().enumerate() {
            let got = gaspari_cohn(k as f64, 2.0);
            assert!(
                (got - w).abs() < 1e-6 * w.max(1e-3),
                "distance {k}: {got} vs {w}"
            );
        }
    }

    #[test]
    fn ring_distance_wraps_around() {
        assert_eq!(ring_distance(1, 39, 40), 2);
        assert_eq!(ring_distance(5, 9, 40), 4);
        assert_eq!(ring_distance(0, 20, 40), 20);
    }
}
