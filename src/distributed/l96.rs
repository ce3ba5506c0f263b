//! The Lorenz-96 forecast of one slab, with halo cells exchanged between neighbouring ranks.
//!
//! `dx_k/dt = (x_{k+1} − x_{k−2}) x_{k−1} − x_k + F` reads two components on the left and one
//! on the right, so a slab of `len ≥ 2` components is integrated on a padded row
//! `[x_{s−2}, x_{s−1}, x_s … x_{s+len−1}, x_{s+len}]`; before every right-hand-side evaluation
//! (every Runge–Kutta stage) each rank sends the last two components of every member to its
//! right neighbour and the first one to its left neighbour (periodic: rank 0's left neighbour
//! is the last rank), in one message per direction for all members. The stage arithmetic is
//! that of [`crate::model::rk::step`], expression for expression, so a slab advances exactly as
//! the same components of the whole state do.

use super::Shard;
use crate::error::{Error, Result};
use crate::model::rk::{combine, stage_input};
use crate::model::{Model, System};

/// Scratch of a slab forecast, kept between cycles.
#[derive(Debug, Default)]
pub struct SlabForecast {
    padded: Vec<f32>,
    k: [Vec<f32>; 4],
    to_left: Vec<f32>,
    to_right: Vec<f32>,
    from_left: Vec<f32>,
    from_right: Vec<f32>,
}

impl SlabForecast {
    /// Empty scratch (sized on first use).
    pub fn new() -> Self {
        Self::default()
    }

    /// Advances the `n` members of the slab (`x` is `n × len`, row-major) by `steps` model
    /// steps of the Lorenz-96 `model`, exchanging halos through `shard`'s communicator.
    pub fn advance(
        &mut self,
        model: &Model,
        shard: &Shard,
        x: &mut [f32],
        n: usize,
        steps: usize,
    ) -> Result<()> {
        let System::Lorenz96(l96) = &model.system else {
            return Err(super::refuse(
                shard.comm.size(),
                format!("the model {} has no slab forecast", model.name()),
                "only Lorenz-96 can be sharded",
            ));
        };
        let len = shard.slab.len;
        if len < 2 || x.len() != n * len || l96.d != shard.slab.d {
            return Err(Error::shape(
                "slab forecast",
                format!("{n} x {len} (len ≥ 2) of d = {}", l96.d),
                format!("{} values of d = {}", x.len(), shard.slab.d),
            ));
        }
        let (f, h) = (l96.forcing, model.dt);
        let width = len + 3;
        self.padded.resize(n * width, 0.0);
        for k in self.k.iter_mut() {
            k.resize(n * len, 0.0);
        }
        self.to_left.resize(n, 0.0);
        self.to_right.resize(2 * n, 0.0);
        self.from_left.resize(2 * n, 0.0);
        self.from_right.resize(n, 0.0);
        for _ in 0..steps {
            // Stage 1 at x.
            self.rhs(shard, f, x, n, len, 0)?;
            let scheme = model.scheme;
            for stage in 1..4 {
                self.stage(shard, f, x, n, len, stage, |x, k, c| {
                    stage_input(scheme, stage, h, x[c], [k[0][c], k[1][c], k[2][c]])
                })?;
            }
            let [k1, k2, k3, k4] = &self.k;
            for c in 0..n * len {
                x[c] += combine(scheme, h, [k1[c], k2[c], k3[c], k4[c]]);
            }
        }
        Ok(())
    }

    /// Evaluates the stage state `tmp[c] = combine(x, k, c)` and its right-hand side into
    /// `k[into]`.
    #[allow(clippy::too_many_arguments)]
    fn stage(
        &mut self,
        shard: &Shard,
        f: f32,
        x: &[f32],
        n: usize,
        len: usize,
        into: usize,
        combine: impl Fn(&[f32], &[Vec<f32>; 4], usize) -> f32,
    ) -> Result<()> {
        let width = len + 3;
        for i in 0..n {
            for j in 0..len {
                let c = i * len + j;
                self.padded[i * width + 2 + j] = combine(x, &self.k, c);
            }
        }
        self.exchange_and_rhs(shard, f, n, len, into)
    }

    /// The right-hand side at `x` itself into `k[into]`.
    fn rhs(
        &mut self,
        shard: &Shard,
        f: f32,
        x: &[f32],
        n: usize,
        len: usize,
        into: usize,
    ) -> Result<()> {
        let width = len + 3;
        for i in 0..n {
            self.padded[i * width + 2..i * width + 2 + len].copy_from_slice(&x[i * len..][..len]);
        }
        self.exchange_and_rhs(shard, f, n, len, into)
    }

    /// Fills the halo cells of the padded rows from the neighbours, then evaluates the vector
    /// field of the slab into `k[into]`.
    fn exchange_and_rhs(
        &mut self,
        shard: &Shard,
        f: f32,
        n: usize,
        len: usize,
        into: usize,
    ) -> Result<()> {
        let width = len + 3;
        for i in 0..n {
            let row = &self.padded[i * width..(i + 1) * width];
            self.to_left[i] = row[2];
            self.to_right[2 * i] = row[len];
            self.to_right[2 * i + 1] = row[len + 1];
        }
        shard.comm.exchange(
            &self.to_left,
            &self.to_right,
            &mut self.from_left,
            &mut self.from_right,
        )?;
        let out = &mut self.k[into];
        for i in 0..n {
            let row = &mut self.padded[i * width..(i + 1) * width];
            row[0] = self.from_left[2 * i];
            row[1] = self.from_left[2 * i + 1];
            row[len + 2] = self.from_right[i];
            let dx = &mut out[i * len..(i + 1) * len];
            // Component j sits at row[j + 2]; the expression is Lorenz96::rhs's.
            for j in 0..len {
                dx[j] = (row[j + 3] - row[j]) * row[j + 1] - row[j + 2] + f;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Scheme;
    use crate::model::{rk, Lorenz96};

    #[test]
    fn one_slab_advances_exactly_like_the_whole_state() {
        for scheme in [Scheme::Rk4Classic, Scheme::Rk4ThreeEighths] {
            let d = 11;
            let model = Model::new(
                System::Lorenz96(Lorenz96::new(d, 8.0).unwrap()),
                0.01,
                scheme,
            )
            .unwrap();
            let n = 2;
            let x0: Vec<f32> = (0..n * d)
                .map(|c| ((c * 37) % 17) as f32 * 0.3 - 2.0)
                .collect();
            let mut whole = x0.clone();
            let mut scratch = vec![0.0; rk::SCRATCH_VECTORS * d];
            for row in whole.chunks_mut(d) {
                rk::advance_state(&model, row, 7, &mut scratch);
            }
            let mut slab = x0.clone();
            SlabForecast::new()
                .advance(&model, &Shard::single(d), &mut slab, n, 7)
                .unwrap();
            assert_eq!(slab, whole, "{scheme:?}");
        }
    }
}
