//! Gaspari–Cohn localization (ENFF_SPEC §6.3), with DAPPER's convention that the support
//! half-width is `1.82 · radius`, measured on the model's [`Geometry`].
//!
//! Observation `q` of a built-in operator `Observe { every, offset }` sits at state component
//! `offset + q · every`. (The reference code places observation `q` at index `q`, which agrees
//! only when every component is observed.)

use crate::error::{Error, Result};
use crate::model::{DistanceKind, Geometry};
use crate::observe::Observe;

/// Taper below which an observation is left out of a local analysis (as in the reference).
pub const RHO_MIN: f64 = 1e-6;

/// Checks a localization radius.
pub fn check_radius(radius: f64) -> Result<()> {
    if radius.is_finite() && radius > 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(
            "filter.loc_radius",
            radius,
            "the localization radius must be a finite positive number of grid points \
             (tuned in 1-16; leave it unset for a global EnKF)",
        ))
    }
}

/// A Gaspari–Cohn taper of radius `radius` on a geometry of dimension `d`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Localization {
    /// Radius in grid spacings (DAPPER's 1.82 convention).
    pub radius: f64,
    /// Where distances are measured.
    pub geometry: Geometry,
}

impl Localization {
    /// A validated localization for a model of dimension `d` with geometry `geometry`, using
    /// the model's geometry or the flattened-index ring (`kind`). A model without spatial
    /// structure cannot be localized: that is an error naming the fix.
    pub fn new(radius: f64, geometry: Geometry, kind: DistanceKind, d: usize) -> Result<Self> {
        check_radius(radius)?;
        let geometry = geometry.with_distance(kind, d);
        if !geometry.is_spatial() {
            return Err(Error::invalid(
                "filter.loc_radius",
                radius,
                "this model has no spatial geometry to localize on: use a global filter (the \
                 EnKF with filter.loc_radius unset, or the ETKF instead of the LETKF), or set \
                 filter.loc_distance=flattened to use the index distance",
            ));
        }
        if geometry.dim() != Some(d) {
            return Err(Error::shape(
                "localization geometry",
                format!("{d} components"),
                format!("{:?}", geometry),
            ));
        }
        Ok(Localization { radius, geometry })
    }

    /// Distance beyond which the taper vanishes: `2 · 1.82 · radius`.
    pub fn reach(&self) -> f64 {
        2.0 * 1.82 * self.radius
    }

    /// The taper between components `i` and `j`.
    pub fn taper(&self, i: usize, j: usize) -> f64 {
        gaspari_cohn(self.geometry.distance(i, j), self.radius)
    }

    /// The observations of `op` (of `m`) that a local analysis of component `k` uses, with
    /// their tapers (those above [`RHO_MIN`]), in increasing observation index.
    pub fn local_observations(&self, k: usize, op: &Observe, m: usize) -> Vec<(usize, f64)> {
        let mut out: Vec<(usize, f64)> = self
            .geometry
            .neighbours(k, self.reach())
            .into_iter()
            .filter_map(|(c, dist)| {
                let q = observation_at(op, m, c)?;
                let rho = gaspari_cohn(dist, self.radius);
                (rho > RHO_MIN).then_some((q, rho))
            })
            .collect();
        out.sort_unstable_by_key(|p| p.0);
        out
    }
}

/// The index of the observation of `op` (of `m`) sitting at component `c`, if any.
pub fn observation_at(op: &Observe, m: usize, c: usize) -> Option<usize> {
    if c < op.offset || !(c - op.offset).is_multiple_of(op.every) {
        return None;
    }
    let q = (c - op.offset) / op.every;
    (q < m).then_some(q)
}

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
    use crate::observe::ObservationOperator;

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
    fn local_observations_follow_the_geometry_and_the_subsampling() {
        let op = Observe::identity().subsample(2, 1).unwrap();
        let d = 20;
        let m = op.obs_dim(d).unwrap();
        let loc =
            Localization::new(0.5, Geometry::Ring { len: d }, DistanceKind::Geometry, d).unwrap();
        // reach 1.82: components 18, 19, 0, 1, 2 around 0; observed ones: 19 (q 9), 1 (q 0).
        let got = loc.local_observations(0, &op, m);
        assert_eq!(got.iter().map(|p| p.0).collect::<Vec<_>>(), vec![0, 9]);
        assert!((got[0].1 - gaspari_cohn(1.0, 0.5)).abs() < 1e-12);
        // On a torus the flattened distance differs from the grid distance.
        let torus = Geometry::Torus {
            nx: 6,
            ny: 6,
            fields: 1,
        };
        let geo = Localization::new(1.0, torus, DistanceKind::Geometry, 36).unwrap();
        let flat = Localization::new(1.0, torus, DistanceKind::Flattened, 36).unwrap();
        assert_eq!(geo.taper(0, 6), gaspari_cohn(1.0, 1.0));
        assert_eq!(flat.taper(0, 6), gaspari_cohn(6.0, 1.0));
        assert!(Localization::new(1.0, Geometry::None, DistanceKind::Geometry, 3).is_err());
        assert!(Localization::new(1.0, Geometry::None, DistanceKind::Flattened, 3).is_ok());
        let e = Localization::new(0.0, torus, DistanceKind::Geometry, 36).unwrap_err();
        assert!(e.to_string().contains("filter.loc_radius"), "{e}");
    }

    #[test]
    fn ring_distance_wraps_around() {
        assert_eq!(ring_distance(1, 39, 40), 2);
        assert_eq!(ring_distance(5, 9, 40), 4);
        assert_eq!(ring_distance(0, 20, 40), 20);
    }
}
