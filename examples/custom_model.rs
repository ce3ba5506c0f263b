//! Your own model and your own observation operator: the Rössler system as a user vector
//! field, observed through a user operator (the sum of the first two variables and the
//! hyperbolic tangent of the third), assimilated by EnFF-OT through the `Assimilator` builder.
//!
//! ```sh
//! cargo run --release --example custom_model
//! ```

use enff::backend::{cpu::Cpu, Backend};
use enff::model::{Dynamics, Model, Scheme, System};
use enff::observe::ObservationOperator;
use enff::rng::{fill_normal_row, NoiseKey, Stream};
use enff::{Assimilator, Ensemble};
use std::sync::Arc;

/// The Rössler system `ẋ = −y − z, ẏ = x + a y, ż = b + z (x − c)`.
#[derive(Debug, Clone, Copy)]
struct Rossler {
    a: f32,
    b: f32,
    c: f32,
}

impl Dynamics for Rossler {
    fn dim(&self) -> usize {
        3
    }
    fn rhs(&self, x: &[f32], dx: &mut [f32]) {
        dx[0] = -x[1] - x[2];
        dx[1] = x[0] + self.a * x[1];
        dx[2] = self.b + x[2] * (x[0] - self.c);
    }
}

/// `h(x) = (x₀ + x₁, tanh(x₂))`, with its Jacobian-transpose action.
#[derive(Debug)]
struct SumAndTanh;

impl ObservationOperator for SumAndTanh {
    fn name(&self) -> String {
        "(x0 + x1, tanh x2)".into()
    }
    fn obs_dim(&self, d: usize) -> enff::Result<usize> {
        if d != 3 {
            return Err(enff::Error::invalid(
                "d",
                d,
                "this operator observes 3-D states",
            ));
        }
        Ok(2)
    }
    fn apply(&self, x: &[f32], y: &mut [f32]) {
        y[0] = x[0] + x[1];
        y[1] = x[2].tanh();
    }
    fn adjoint(&self, x: &[f32], r: &[f32], out: &mut [f32]) {
        let t = x[2].tanh();
        out[0] = r[0];
        out[1] = r[0];
        out[2] = (1.0 - t * t) * r[1];
    }
}

fn main() -> anyhow::Result<()> {
    let rossler = Rossler {
        a: 0.2,
        b: 0.2,
        c: 5.7,
    };
    let (n, dt, steps, sigma_y, cycles) = (30usize, 0.05f32, 10usize, 0.3f32, 200usize);
    let cpu = Cpu::new();

    // The truth runs the same vector field through an enff model.
    let truth_model = Model::new(
        System::Custom(Arc::new(rossler)),
        dt,
        Scheme::Rk4ThreeEighths,
    )?;
    let mut truth = cpu.upload(1, 3, &[1.0, 1.0, 0.0])?;
    cpu.advance(&truth_model, &mut truth, 1000)?;

    // A wide initial ensemble around the origin: the filter has to find the attractor.
    let key = NoiseKey::new(3, Stream::InitialEnsemble, 0);
    let rows: Vec<Vec<f32>> = (0..n)
        .map(|i| {
            let mut z = vec![0.0f32; 3];
            fill_normal_row(&key, i as u32, &mut z);
            z.iter().map(|v| 4.0 * v).collect()
        })
        .collect();

    let mut da = Assimilator::builder()
        .filter("enff-ot")
        .set("filter.sigma_min=0.2")
        .set("filter.guidance_scale=0.5")
        .set("filter.flow_steps=10")
        .operator(SumAndTanh)
        .obs_noise_std(sigma_y)
        .dynamics(rossler, dt, steps)
        .initial_ensemble(Ensemble::from_rows(&rows)?)
        .seed(3)
        .build(&cpu)?;

    println!("observing h(x) = (x0 + x1, tanh x2) with noise std {sigma_y}");
    println!("cycle   rmse analysis   spread   mean state");
    let x0 = cpu.read(&truth)?;
    println!(
        "    0   {:13.3}   {:6.3}",
        da.stats(&x0)?.rmse,
        da.stats(&x0)?.spread
    );
    for k in 1..=cycles {
        cpu.advance(&truth_model, &mut truth, steps)?;
        let x = cpu.read(&truth)?;
        da.forecast()?;
        let mut eta = [0.0f32; 2];
        fill_normal_row(
            &NoiseKey::new(3, Stream::Observation, k as u32),
            0,
            &mut eta,
        );
        let y: Vec<f32> = da
            .observe(&x)?
            .iter()
            .zip(eta)
            .map(|(h, e)| h + sigma_y * e)
            .collect();
        da.analyse(&y)?;
        if k % 25 == 0 {
            let s = da.stats(&x)?;
            let m = da.mean()?;
            println!(
                "{k:5}   {:13.3}   {:6.3}   ({:6.2}, {:6.2}, {:6.2}) truth ({:6.2}, {:6.2}, {:6.2})",
                s.rmse, s.spread, m[0], m[1], m[2], x[0], x[1], x[2]
            );
        }
    }
    Ok(())
}
