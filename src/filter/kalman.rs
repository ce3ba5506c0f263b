//! The exact Kalman filter for linear models and observation operators (ENFF_SPEC §6.2):
//! the single ensemble member is the mean, the covariance `P` lives on the host in f64.

use nalgebra::{DMatrix, DVector};

use crate::backend::{Backend, DeviceBuffer};
use crate::error::{Error, Result};
use crate::filter::{Filter, Observation};
use crate::model::{Model, System};
use crate::observe::{ObservationOperator, Pointwise};

/// The Kalman filter.
pub struct KalmanFilter {
    /// Model propagator over one observation interval.
    f: DMatrix<f64>,
    /// Covariance of the current estimate.
    p: DMatrix<f64>,
    analyses: usize,
}

impl KalmanFilter {
    /// A Kalman filter for `model` advanced `obs_every` steps between observations, starting
    /// from covariance `init_std² I`. Only linear models qualify (Rotation2D).
    pub fn new(model: &Model, obs_every: usize, init_std: f32) -> Result<Self> {
        let f = match &model.system {
            System::Rotation2d(r) => {
                let (s, c) = (r.theta * obs_every as f64).sin_cos();
                DMatrix::from_row_slice(2, 2, &[c, -s, s, c])
            }
            _ => {
                return Err(Error::invalid(
                    "filter.kind",
                    "kf",
                    format!(
                        "the Kalman filter needs a linear model; {} is not (use rotation2d, or \
                         an ensemble filter)",
                        model.name()
                    ),
                ))
            }
        };
        if !(init_std.is_finite() && init_std > 0.0) {
            return Err(Error::invalid(
                "ensemble.init_std",
                init_std,
                "the Kalman filter's initial covariance init_std² I must be positive",
            ));
        }
        let d = f.nrows();
        Ok(KalmanFilter {
            f,
            p: DMatrix::identity(d, d) * (init_std as f64).powi(2),
            analyses: 0,
        })
    }

    /// The current covariance.
    pub fn covariance(&self) -> &DMatrix<f64> {
        &self.p
    }
}

/// The matrix of a linear built-in operator (identity of a subsample).
fn observation_matrix(op: &dyn ObservationOperator, d: usize) -> Result<DMatrix<f64>> {
    let b = op
        .builtin()
        .filter(|b| b.pointwise == Pointwise::Identity)
        .ok_or_else(|| {
            Error::invalid(
                "observe.operator",
                op.name(),
                "the Kalman filter needs a linear observation operator: identity (subsampled or not)",
            )
        })?;
    let m = op.obs_dim(d)?;
    let mut h = DMatrix::zeros(m, d);
    for k in 0..m {
        h[(k, b.component(k))] = 1.0;
    }
    Ok(h)
}

impl<B: Backend> Filter<B> for KalmanFilter {
    fn name(&self) -> String {
        "kf".into()
    }

    fn save_state(&self) -> Vec<f64> {
        let mut s = vec![self.analyses as f64];
        s.extend(self.p.iter());
        s
    }

    fn restore_state(&mut self, state: &[f64]) -> Result<()> {
        let d = self.p.nrows();
        if state.len() != 1 + d * d {
            return Err(Error::shape("Kalman filter state", 1 + d * d, state.len()));
        }
        self.analyses = state[0] as usize;
        self.p = DMatrix::from_column_slice(d, d, &state[1..]);
        Ok(())
    }

    fn analyse(
        &mut self,
        backend: &B,
        ensemble: &mut B::Buffer,
        _previous: Option<&B::Buffer>,
        obs: &Observation<'_, B>,
        _cycle: u32,
    ) -> Result<()> {
        let (n, d) = (ensemble.rows(), ensemble.cols());
        if n != 1 {
            return Err(Error::invalid(
                "ensemble.n",
                n,
                "the Kalman filter carries the mean as its single member: set ensemble.n=1",
            ));
        }
        if d != self.f.nrows() {
            return Err(Error::shape("state", self.f.nrows(), d));
        }
        let h = observation_matrix(obs.operator, d)?;
        // The experiment forecasts the mean; the filter forecasts the covariance (not on the
        // first analysis, which has no forecast step).
        if self.analyses > 0 {
            self.p = &self.f * &self.p * self.f.transpose();
        }
        let x = DVector::from_iterator(d, backend.read(ensemble)?.iter().map(|&v| v as f64));
        let y = DVector::from_iterator(h.nrows(), backend.read(obs.y)?.iter().map(|&v| v as f64));
        if let Some(i) = y.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                name: "observation".into(),
                location: format!("index {i}"),
                value: y[i],
                hint: "check the observations".into(),
            });
        }
        let r = (obs.noise_std as f64).powi(2);
        let s = &h * &self.p * h.transpose() + DMatrix::identity(h.nrows(), h.nrows()) * r;
        let s_inv = s
            .clone()
            .try_inverse()
            .or_else(|| s.pseudo_inverse(1e-12).ok())
            .ok_or_else(|| Error::invalid("innovation covariance", "singular", "check σ_y"))?;
        let k = &self.p * h.transpose() * s_inv;
        let xa = &x + &k * (&y - &h * &x);
        self.p = (DMatrix::identity(d, d) - &k * &h) * &self.p;
        self.analyses += 1;
        let host: Vec<f32> = xa.iter().map(|&v| v as f32).collect();
        backend.write(ensemble, &host)
    }
}
