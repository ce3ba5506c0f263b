//! Runge–Kutta steps for one state vector, with caller-provided scratch (no allocation).

use super::{Model, Scheme, System};

/// Number of length-`d` scratch vectors [`step`] needs.
pub const SCRATCH_VECTORS: usize = 5;

/// Advances one state `x` by `steps` model steps in place (ODE systems and Rotation2D).
///
/// `scratch` must hold at least `SCRATCH_VECTORS * x.len()` values. The grid models
/// (Kuramoto–Sivashinsky, Navier–Stokes) are not Runge–Kutta systems and need scratch of their
/// own: the backends call their `advance` directly; here they get freshly allocated scratch
/// (a convenience path, not a kernel).
pub fn advance_state(model: &Model, x: &mut [f32], steps: usize, scratch: &mut [f32]) {
    match &model.system {
        System::KuramotoSivashinsky(ks) => {
            let mut own = vec![Default::default(); ks.scratch_len()];
            return ks.advance(x, steps, &mut own);
        }
        System::NavierStokes2d(ns) => {
            let mut own = vec![0.0; ns.scratch_len()];
            return ns.advance(x, steps, &mut own);
        }
        _ => {}
    }
    if let System::Rotation2d(r) = &model.system {
        let angle = r.theta * steps as f64;
        let (s, c) = angle.sin_cos();
        let (a, b) = (x[0] as f64, x[1] as f64);
        x[0] = (c * a - s * b) as f32;
        x[1] = (s * a + c * b) as f32;
        return;
    }
    for _ in 0..steps {
        step(model, x, scratch);
    }
}

/// One Runge–Kutta step of an ODE model (ENFF_SPEC §8.8 for the 3/8 rule).
pub fn step(model: &Model, x: &mut [f32], scratch: &mut [f32]) {
    let d = x.len();
    let h = model.dt;
    let (k1, rest) = scratch.split_at_mut(d);
    let (k2, rest) = rest.split_at_mut(d);
    let (k3, rest) = rest.split_at_mut(d);
    let (k4, rest) = rest.split_at_mut(d);
    let tmp = &mut rest[..d];
    model.rhs(x, k1);
    match model.scheme {
        Scheme::Rk4ThreeEighths => {
            // k2 = f(x + h/3 k1)
            for c in 0..d {
                tmp[c] = x[c] + h / 3.0 * k1[c];
            }
            model.rhs(tmp, k2);
            // k3 = f(x + h (k2 - k1/3))
            for c in 0..d {
                tmp[c] = x[c] + h * (k2[c] - k1[c] / 3.0);
            }
            model.rhs(tmp, k3);
            // k4 = f(x + h (k1 - k2 + k3))
            for c in 0..d {
                tmp[c] = x[c] + h * (k1[c] - k2[c] + k3[c]);
            }
            model.rhs(tmp, k4);
            for c in 0..d {
                x[c] += h / 8.0 * (k1[c] + 3.0 * k2[c] + 3.0 * k3[c] + k4[c]);
            }
        }
        Scheme::Rk4Classic => {
            for c in 0..d {
                tmp[c] = x[c] + 0.5 * h * k1[c];
            }
            model.rhs(tmp, k2);
            for c in 0..d {
                tmp[c] = x[c] + 0.5 * h * k2[c];
            }
            model.rhs(tmp, k3);
            for c in 0..d {
                tmp[c] = x[c] + h * k3[c];
            }
            model.rhs(tmp, k4);
            for c in 0..d {
                x[c] += h / 6.0 * (k1[c] + 2.0 * k2[c] + 2.0 * k3[c] + k4[c]);
            }
        }
    }
}
