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

/// The Butcher tableau of a scheme in the form the device kernel takes: stage `s` evaluates
/// `f(x + dt·(a[s][0]·k1 + a[s][1]·k2 + a[s][2]·k3))`, and the step is
/// `x + dt·Σ b[s]·k_s` (ENFF_SPEC §8.8 for the 3/8 rule).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tableau {
    /// Stage coefficients `a` (row 0 is the first stage, at `x` itself).
    pub a: [[f32; 3]; 4],
    /// Weights `b` of the final combination.
    pub b: [f32; 4],
}

/// The tableau of `scheme`; [`stage_input`] and [`combine`] are the same rules written as the
/// host evaluates them.
pub fn tableau(scheme: Scheme) -> Tableau {
    match scheme {
        Scheme::Rk4ThreeEighths => Tableau {
            a: [
                [0.0, 0.0, 0.0],
                [1.0 / 3.0, 0.0, 0.0],
                [-1.0 / 3.0, 1.0, 0.0],
                [1.0, -1.0, 1.0],
            ],
            b: [1.0 / 8.0, 3.0 / 8.0, 3.0 / 8.0, 1.0 / 8.0],
        },
        Scheme::Rk4Classic => Tableau {
            a: [
                [0.0, 0.0, 0.0],
                [0.5, 0.0, 0.0],
                [0.0, 0.5, 0.0],
                [0.0, 0.0, 1.0],
            ],
            b: [1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0],
        },
    }
}

/// The argument of stage `s` (1, 2 or 3) of one component, from the state `x` and the
/// earlier stages `k` (`k[j]` unused from stage `j + 1` on): the host's form of
/// [`tableau`]`(scheme).a[s]`, shared by the CPU backend and the sharded forecast.
#[inline(always)]
pub fn stage_input(scheme: Scheme, s: usize, h: f32, x: f32, k: [f32; 3]) -> f32 {
    match (scheme, s) {
        (Scheme::Rk4ThreeEighths, 1) => x + h / 3.0 * k[0],
        (Scheme::Rk4ThreeEighths, 2) => x + h * (k[1] - k[0] / 3.0),
        (Scheme::Rk4ThreeEighths, _) => x + h * (k[0] - k[1] + k[2]),
        (Scheme::Rk4Classic, 1) => x + 0.5 * h * k[0],
        (Scheme::Rk4Classic, 2) => x + 0.5 * h * k[1],
        (Scheme::Rk4Classic, _) => x + h * k[2],
    }
}

/// The step's increment of one component from its four stages: the host's form of
/// [`tableau`]`(scheme).b`.
#[inline(always)]
pub fn combine(scheme: Scheme, h: f32, k: [f32; 4]) -> f32 {
    match scheme {
        Scheme::Rk4ThreeEighths => h / 8.0 * (k[0] + 3.0 * k[1] + 3.0 * k[2] + k[3]),
        Scheme::Rk4Classic => h / 6.0 * (k[0] + 2.0 * k[1] + 2.0 * k[2] + k[3]),
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
    // One arm per scheme, so that the stage rules are constants inside the loops.
    macro_rules! stages {
        ($scheme:expr) => {{
            for c in 0..d {
                tmp[c] = stage_input($scheme, 1, h, x[c], [k1[c], 0.0, 0.0]);
            }
            model.rhs(tmp, k2);
            for c in 0..d {
                tmp[c] = stage_input($scheme, 2, h, x[c], [k1[c], k2[c], 0.0]);
            }
            model.rhs(tmp, k3);
            for c in 0..d {
                tmp[c] = stage_input($scheme, 3, h, x[c], [k1[c], k2[c], k3[c]]);
            }
            model.rhs(tmp, k4);
            for c in 0..d {
                x[c] += combine($scheme, h, [k1[c], k2[c], k3[c], k4[c]]);
            }
        }};
    }
    match model.scheme {
        Scheme::Rk4ThreeEighths => stages!(Scheme::Rk4ThreeEighths),
        Scheme::Rk4Classic => stages!(Scheme::Rk4Classic),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tableau_and_the_host_rules_are_the_same_scheme() {
        // In f64 arithmetic on the f32 inputs the two forms agree to rounding.
        let (h, x, k) = (0.05f32, 0.7f32, [1.3f32, -0.4, 2.1, 0.9]);
        for scheme in [Scheme::Rk4ThreeEighths, Scheme::Rk4Classic] {
            let t = tableau(scheme);
            for s in 1..4 {
                let via_tableau = x + h * (t.a[s][0] * k[0] + t.a[s][1] * k[1] + t.a[s][2] * k[2]);
                let host = stage_input(scheme, s, h, x, [k[0], k[1], k[2]]);
                assert!((via_tableau - host).abs() < 1e-6, "{scheme:?} stage {s}");
            }
            let via_tableau = h * (t.b[0] * k[0] + t.b[1] * k[1] + t.b[2] * k[2] + t.b[3] * k[3]);
            assert!(
                (via_tableau - combine(scheme, h, k)).abs() < 1e-6,
                "{scheme:?}"
            );
            assert!((t.b.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }
}
