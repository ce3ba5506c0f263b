//! Where the state components of a model sit in space, for localization (Gaspari–Cohn tapers
//! in the EnKF, LETKF and covariance guidance).
//!
//! Distances are measured in grid spacings. A 1-D ring (Lorenz-96, Kuramoto–Sivashinsky) uses
//! the periodic index distance; a 2-D torus (Navier–Stokes) uses the periodic Euclidean
//! distance between grid points, so the `p`, `u` and `v` components at one grid point are at
//! distance 0 from each other. [`Geometry::Flattened`] is the reference implementation's
//! convention (periodic distance between flattened indices), kept for parity.

use serde::{Deserialize, Serialize};

/// The spatial layout of a state vector of dimension `d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Geometry {
    /// No spatial structure (Lorenz-63, Rotation2D, a user model that declares none): every
    /// pair of components is at distance 0, so a taper does not localize anything.
    None,
    /// `len` points on a periodic ring; component `i` sits at point `i`.
    Ring {
        /// Number of points (= d).
        len: usize,
    },
    /// `fields` fields on an `nx × ny` periodic grid, stored field-major then row-major:
    /// component `c·nx·ny + i·ny + j` is field `c` at row `i`, column `j`.
    Torus {
        /// Rows.
        nx: usize,
        /// Columns.
        ny: usize,
        /// Fields per grid point (3 for Navier–Stokes: p, u, v).
        fields: usize,
    },
    /// The periodic distance between flattened indices on a ring of length `len`, whatever
    /// the model's layout (the reference implementation's convention).
    Flattened {
        /// Ring length (= d).
        len: usize,
    },
}

/// Which distance a localized filter uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DistanceKind {
    /// The model's geometry (ring or torus).
    #[default]
    Geometry,
    /// Periodic distance between flattened indices (parity with the reference code).
    Flattened,
}

impl DistanceKind {
    /// Parses `geometry` or `flattened`.
    pub fn parse(s: &str) -> crate::error::Result<Self> {
        match s {
            "geometry" => Ok(DistanceKind::Geometry),
            "flattened" => Ok(DistanceKind::Flattened),
            other => Err(crate::error::Error::invalid(
                "filter.loc_distance",
                other,
                "use `geometry` (the model's ring or torus) or `flattened` (index distance)",
            )),
        }
    }
}

impl Geometry {
    /// The state dimension this geometry describes (`None` for [`Geometry::None`]).
    pub fn dim(&self) -> Option<usize> {
        match *self {
            Geometry::None => None,
            Geometry::Ring { len } | Geometry::Flattened { len } => Some(len),
            Geometry::Torus { nx, ny, fields } => Some(nx * ny * fields),
        }
    }

    /// This geometry, or the flattened-index ring of the same dimension.
    pub fn with_distance(self, kind: DistanceKind, d: usize) -> Geometry {
        match kind {
            DistanceKind::Geometry => self,
            DistanceKind::Flattened => Geometry::Flattened { len: d },
        }
    }

    /// True when distances carry spatial information (everything but [`Geometry::None`]).
    pub fn is_spatial(&self) -> bool {
        !matches!(self, Geometry::None)
    }

    /// Grid coordinates of component `i`: `(position on the ring, 0)` or `(row, column)`.
    pub fn coords(&self, i: usize) -> (usize, usize) {
        match *self {
            Geometry::None => (0, 0),
            Geometry::Ring { len } | Geometry::Flattened { len } => (i % len.max(1), 0),
            Geometry::Torus { nx, ny, .. } => {
                let cell = i % (nx * ny).max(1);
                (cell / ny.max(1), cell % ny.max(1))
            }
        }
    }

    /// Distance between components `i` and `j`, in grid spacings.
    pub fn distance(&self, i: usize, j: usize) -> f64 {
        match *self {
            Geometry::None => 0.0,
            Geometry::Ring { len } | Geometry::Flattened { len } => {
                periodic(i % len.max(1), j % len.max(1), len) as f64
            }
            Geometry::Torus { nx, ny, .. } => {
                let (a, b) = (self.coords(i), self.coords(j));
                let dx = periodic(a.0, b.0, nx) as f64;
                let dy = periodic(a.1, b.1, ny) as f64;
                (dx * dx + dy * dy).sqrt()
            }
        }
    }

    /// The components within distance `reach` of component `i`, each with its distance
    /// (including `i` itself). Enumerates only the neighbourhood, not all `d` components.
    pub fn neighbours(&self, i: usize, reach: f64) -> Vec<(usize, f64)> {
        let mut out = Vec::new();
        match *self {
            Geometry::None => {
                if let Some(d) = self.dim() {
                    out.extend((0..d).map(|j| (j, 0.0)));
                }
            }
            Geometry::Ring { len } | Geometry::Flattened { len } => {
                let r = (reach.max(0.0).floor() as usize).min(len / 2);
                let i = i % len;
                out.push((i, 0.0));
                for k in 1..=r {
                    let right = (i + k) % len;
                    let left = (i + len - k) % len;
                    out.push((right, k as f64));
                    if left != right {
                        out.push((left, k as f64));
                    }
                }
            }
            Geometry::Torus { nx, ny, fields } => {
                let (r0, c0) = self.coords(i);
                let rx = (reach.max(0.0).floor() as usize).min(nx / 2);
                let ry = (reach.max(0.0).floor() as usize).min(ny / 2);
                let mut rows: Vec<usize> = (0..=rx)
                    .flat_map(|k| [(r0 + k) % nx, (r0 + nx - k) % nx])
                    .collect();
                rows.sort_unstable();
                rows.dedup();
                let mut cols: Vec<usize> = (0..=ry)
                    .flat_map(|k| [(c0 + k) % ny, (c0 + ny - k) % ny])
                    .collect();
                cols.sort_unstable();
                cols.dedup();
                for &r in &rows {
                    for &c in &cols {
                        let dx = periodic(r, r0, nx) as f64;
                        let dy = periodic(c, c0, ny) as f64;
                        let dist = (dx * dx + dy * dy).sqrt();
                        if dist <= reach {
                            for f in 0..fields {
                                out.push((f * nx * ny + r * ny + c, dist));
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

fn periodic(a: usize, b: usize, len: usize) -> usize {
    let d = a.abs_diff(b);
    d.min(len.saturating_sub(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_distance_wraps() {
        let g = Geometry::Ring { len: 10 };
        assert_eq!(g.distance(1, 9), 2.0);
        assert_eq!(g.distance(3, 3), 0.0);
        assert_eq!(g.distance(0, 5), 5.0);
    }

    #[test]
    fn torus_distance_is_periodic_euclidean_and_ignores_field() {
        let g = Geometry::Torus {
            nx: 8,
            ny: 8,
            fields: 3,
        };
        // Same grid point in fields p and v.
        assert_eq!(g.distance(2 * 8 + 3, 2 * 64 + 2 * 8 + 3), 0.0);
        // (0,0) to (7,7): one step diagonally across the wrap.
        assert!((g.distance(0, 7 * 8 + 7) - 2f64.sqrt()).abs() < 1e-12);
        // (0,0) to (0,4): four columns.
        assert_eq!(g.distance(0, 4), 4.0);
    }

    #[test]
    fn neighbours_agree_with_distance() {
        for g in [
            Geometry::Ring { len: 11 },
            Geometry::Torus {
                nx: 7,
                ny: 5,
                fields: 2,
            },
        ] {
            let d = g.dim().unwrap();
            for i in [0, 3, d - 1] {
                for reach in [0.0, 1.5, 2.0, 3.7] {
                    let mut got: Vec<usize> =
                        g.neighbours(i, reach).into_iter().map(|p| p.0).collect();
                    got.sort_unstable();
                    let want: Vec<usize> = (0..d).filter(|&j| g.distance(i, j) <= reach).collect();
                    assert_eq!(got, want, "{g:?} i={i} reach={reach}");
                    for (j, dist) in g.neighbours(i, reach) {
                        assert_eq!(dist, g.distance(i, j));
                    }
                }
            }
        }
    }
}
