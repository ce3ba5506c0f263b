//! Observation operators `h` and their adjoint action `J_h(x)ᵀ r` (ENFF_SPEC §3.1).
//!
//! The built-in operators are a pointwise map (identity, arctan, tanh) applied to a regular
//! subsample of the state (every `every`-th component starting at `offset`); the two commute, so
//! "arctan of every 2nd component" is one [`Observe`] value. Backends run built-ins in fused
//! kernels. Users can add their own operator by implementing [`ObservationOperator`]; the CPU
//! backend runs those through the trait methods.

use std::fmt;

use crate::error::{Error, Result};

/// An observation operator `h: R^d → R^m` with its Jacobian-transpose action.
pub trait ObservationOperator: Send + Sync + fmt::Debug {
    /// A short human-readable name (e.g. `arctan(every 2 from 0)`).
    fn name(&self) -> String;

    /// The observation dimension `m` for state dimension `d`, or an error if `d` does not fit.
    fn obs_dim(&self, d: usize) -> Result<usize>;

    /// Writes `h(x)` into `y` (`x.len() == d`, `y.len() == m`).
    fn apply(&self, x: &[f32], y: &mut [f32]);

    /// Writes `J_h(x)ᵀ r` into `out` (`x.len() == out.len() == d`, `r.len() == m`).
    fn adjoint(&self, x: &[f32], r: &[f32], out: &mut [f32]);

    /// The fused-kernel description, when this operator is one of the built-ins.
    fn builtin(&self) -> Option<Observe> {
        None
    }

    /// True when `h` is linear (its Jacobian does not depend on `x`).
    fn is_linear(&self) -> bool {
        false
    }
}

/// The pointwise part of a built-in observation operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pointwise {
    /// `h(x) = x`.
    Identity,
    /// `h(x) = arctan(x)`, derivative `1 / (1 + x²)`.
    Arctan,
    /// `h(x) = tanh(x)`, derivative `1 − tanh²(x)`.
    Tanh,
}

impl Pointwise {
    /// `h` at one component.
    #[inline(always)]
    pub fn value(self, x: f32) -> f32 {
        match self {
            Pointwise::Identity => x,
            Pointwise::Arctan => x.atan(),
            Pointwise::Tanh => x.tanh(),
        }
    }

    /// `h'` at one component.
    #[inline(always)]
    pub fn derivative(self, x: f32) -> f32 {
        match self {
            Pointwise::Identity => 1.0,
            Pointwise::Arctan => 1.0 / (1.0 + x * x),
            Pointwise::Tanh => {
                let t = x.tanh();
                1.0 - t * t
            }
        }
    }

    /// Name as used in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            Pointwise::Identity => "identity",
            Pointwise::Arctan => "arctan",
            Pointwise::Tanh => "tanh",
        }
    }
}

/// The built-in observation operator: `pointwise` applied to components
/// `offset, offset + every, offset + 2·every, …` of the state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observe {
    /// Pointwise map.
    pub pointwise: Pointwise,
    /// Stride of the observed components (1 = all).
    pub every: usize,
    /// First observed component.
    pub offset: usize,
}

impl Observe {
    /// Observes every component through `pointwise`.
    pub fn full(pointwise: Pointwise) -> Self {
        Observe {
            pointwise,
            every: 1,
            offset: 0,
        }
    }

    /// The identity operator.
    pub fn identity() -> Self {
        Observe::full(Pointwise::Identity)
    }

    /// `arctan` of every component.
    pub fn arctan() -> Self {
        Observe::full(Pointwise::Arctan)
    }

    /// Restricts this operator to every `every`-th component from `offset`.
    pub fn subsample(self, every: usize, offset: usize) -> Result<Self> {
        if every == 0 {
            return Err(Error::invalid(
                "observe.every",
                every,
                "the subsampling stride must be at least 1 (1 observes every component)",
            ));
        }
        if offset >= every {
            return Err(Error::invalid(
                "observe.offset",
                offset,
                format!("the offset must be smaller than the stride every={every}"),
            ));
        }
        Ok(Observe {
            every,
            offset,
            ..self
        })
    }

    /// Parses a pointwise name (`identity`, `arctan`/`atan`, `tanh`).
    pub fn parse_pointwise(name: &str) -> Result<Pointwise> {
        match name.to_ascii_lowercase().as_str() {
            "identity" | "id" => Ok(Pointwise::Identity),
            "arctan" | "atan" => Ok(Pointwise::Arctan),
            "tanh" => Ok(Pointwise::Tanh),
            other => Err(Error::invalid(
                "observe.operator",
                other,
                "use one of identity, arctan, tanh",
            )),
        }
    }

    /// State component observed by observation index `k`.
    #[inline(always)]
    pub fn component(&self, k: usize) -> usize {
        self.offset + k * self.every
    }
}

impl ObservationOperator for Observe {
    fn name(&self) -> String {
        if self.every == 1 {
            self.pointwise.as_str().to_string()
        } else {
            format!(
                "{}(every {} from {})",
                self.pointwise.as_str(),
                self.every,
                self.offset
            )
        }
    }

    fn obs_dim(&self, d: usize) -> Result<usize> {
        if d <= self.offset {
            return Err(Error::invalid(
                "observe.offset",
                self.offset,
                format!("the offset must be below the state dimension d={d}"),
            ));
        }
        Ok((d - self.offset).div_ceil(self.every))
    }

    fn apply(&self, x: &[f32], y: &mut [f32]) {
        for (k, yk) in y.iter_mut().enumerate() {
            *yk = self.pointwise.value(x[self.component(k)]);
        }
    }

    fn adjoint(&self, x: &[f32], r: &[f32], out: &mut [f32]) {
        if self.every != 1 {
            out.iter_mut().for_each(|v| *v = 0.0);
        }
        for (k, &rk) in r.iter().enumerate() {
            let c = self.component(k);
            out[c] = self.pointwise.derivative(x[c]) * rk;
        }
    }

    fn builtin(&self) -> Option<Observe> {
        Some(*self)
    }

    fn is_linear(&self) -> bool {
        self.pointwise == Pointwise::Identity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subsample_obs_dim_counts_observed_components() {
        let op = Observe::arctan().subsample(3, 1).unwrap();
        assert_eq!(op.obs_dim(10).unwrap(), 3); // 1, 4, 7
        assert_eq!(op.obs_dim(11).unwrap(), 4); // 1, 4, 7, 10
        assert!(op.obs_dim(1).is_err());
        assert!(Observe::identity().subsample(0, 0).is_err());
        assert!(Observe::identity().subsample(2, 2).is_err());
    }

    #[test]
    fn adjoint_matches_finite_differences_of_the_misfit() {
        // d/dx of 0.5 ||y - h(x)||^2 = -J^T (y - h(x)).
        for op in [
            Observe::identity(),
            Observe::arctan().subsample(2, 1).unwrap(),
            Observe::full(Pointwise::Tanh),
        ] {
            let x: Vec<f32> = (0..7).map(|k| 0.3 * k as f32 - 0.8).collect();
            let m = op.obs_dim(7).unwrap();
            let yobs: Vec<f32> = (0..m).map(|k| 0.1 * k as f32).collect();
            let misfit = |x: &[f32]| {
                let mut h = vec![0.0; m];
                op.apply(x, &mut h);
                0.5 * yobs
                    .iter()
                    .zip(&h)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum::<f64>()
            };
            let mut h = vec![0.0; m];
            op.apply(&x, &mut h);
            let r: Vec<f32> = yobs.iter().zip(&h).map(|(a, b)| a - b).collect();
            let mut g = vec![9.0; 7];
            op.adjoint(&x, &r, &mut g);
            for c in 0..7 {
                let eps = 1e-3f32;
                let mut xp = x.clone();
                xp[c] += eps;
                let mut xm = x.clone();
                xm[c] -= eps;
                let fd = (misfit(&xp) - misfit(&xm)) / (2.0 * eps as f64);
                assert!(
                    (fd + g[c] as f64).abs() < 1e-3,
                    "{}: component {c}: fd {fd} vs -adjoint {}",
                    op.name(),
                    -g[c]
                );
            }
        }
    }
}
