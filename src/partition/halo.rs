//! Covariance guidance over ranks: each rank's slab extended by halo components.
//!
//! The local gain of component `i` reads the forecast anomalies and the linearization point of
//! every observed component within its localization window, and the gain step reads the
//! innovations of those observations ([`crate::filter::covariance`]). On a ring those are the
//! components within `reach = 2·1.82·filter.loc_radius` of `i`, so a rank works on its slab
//! extended by `H = ⌊reach⌋ + 1` components on each side, taken from its two neighbours:
//!
//! ```text
//!   extended row = [ last H of rank − 1 | own slab (len) | first H of rank + 1 ]
//! ```
//!
//! The forecast and the observations are extended once per analysis, the predicted endpoints
//! once per guidance stage (one neighbour exchange of `n·H` floats each way). The gains and
//! the gain step then run unchanged on the extended segment, with windows built on a ring of
//! the extended length: for a slab component every window entry lies within `reach < H` along
//! the segment, and the way round the short ring is longer than `H`, so its window, tapers and
//! innovations are those of the single-process run. The halo rows of the result are dropped.
//!
//! Conditions (checked by [`HaloPlan::new`] and, up front, by
//! `crate::experiment::check_shardable`): every slab holds at least `H` components and an extended
//! segment is no longer than the ring, and the observed components repeat around the ring
//! (`observe.every` divides `d` and `observe.offset < observe.every`), so that the halo's
//! observations continue the slab's pattern.

use super::{refuse, Shard, Slab};
use crate::backend::{Backend, DeviceBuffer};
use crate::error::Result;
use crate::observe::{ObservationOperator, Observe};

/// The extended segment of one rank's slab.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HaloPlan {
    /// Halo width `H` on each side.
    pub halo: usize,
    /// The slab's own length.
    pub len: usize,
    /// Extended length `len + 2H`.
    pub ext_len: usize,
    /// The observation operator on the extended segment.
    pub op: Observe,
    /// Observations on the extended segment.
    pub m: usize,
}

/// Halo width of covariance guidance with Gaspari–Cohn radius `radius`: one more than the
/// farthest component a window reaches.
pub fn halo_width(radius: f64) -> usize {
    (2.0 * 1.82 * radius).floor() as usize + 1
}

impl HaloPlan {
    /// The plan of `slab` (one of `ranks` slabs of a ring of `slab.d` components) observed
    /// through `local` (the slab's operator, [`super::local_observe`]); a clear error when the
    /// conditions of the module fail. The ring's operator is taken to be the one whose
    /// pattern the slab's continues (offset below the stride), which
    /// `crate::experiment::check_shardable` checks against the configuration.
    pub fn new(slab: &Slab, ranks: usize, local: &Observe, radius: f64) -> Result<HaloPlan> {
        let global = Observe {
            offset: (slab.start + local.offset) % local.every,
            ..*local
        };
        check(slab.d, ranks, &global, radius)?;
        let halo = halo_width(radius);
        if slab.len < halo || slab.len + 2 * halo > slab.d {
            // Only a hand-made slab gets here: the even split passed `check`.
            return Err(refuse(
                ranks,
                format!(
                    "the slab {}..{} is too narrow for covariance guidance's {halo} halo \
                     components (or too wide for a ring of {})",
                    slab.start,
                    slab.end(),
                    slab.d
                ),
                "use slabs of at least that many components (Slab::of splits evenly)",
            ));
        }
        let ext_len = slab.len + 2 * halo;
        let op = Observe {
            offset: (local.offset + halo) % local.every,
            ..*local
        };
        let m = op.obs_dim(ext_len)?;
        Ok(HaloPlan {
            halo,
            len: slab.len,
            ext_len,
            op,
            m,
        })
    }

    /// `rows × len` slab values (row-major) extended to `rows × ext_len` with the neighbours'
    /// edge columns (one exchange).
    pub fn extend(&self, shard: &Shard, local: &[f32], rows: usize) -> Result<Vec<f32>> {
        let (h, len) = (self.halo, self.len);
        debug_assert_eq!(local.len(), rows * len);
        let mut to_left = Vec::with_capacity(rows * h);
        let mut to_right = Vec::with_capacity(rows * h);
        for row in local.chunks(len) {
            to_left.extend_from_slice(&row[..h]);
            to_right.extend_from_slice(&row[len - h..]);
        }
        let (mut from_left, mut from_right) = (vec![0.0; rows * h], vec![0.0; rows * h]);
        shard
            .comm
            .exchange(&to_left, &to_right, &mut from_left, &mut from_right)?;
        let mut out = Vec::with_capacity(rows * self.ext_len);
        for (r, row) in local.chunks(len).enumerate() {
            out.extend_from_slice(&from_left[r * h..(r + 1) * h]);
            out.extend_from_slice(row);
            out.extend_from_slice(&from_right[r * h..(r + 1) * h]);
        }
        Ok(out)
    }

    /// `rows × len` slab values padded with zero halo columns (no exchange: for the state and
    /// velocity, whose halo rows of the result are dropped).
    pub fn pad(&self, local: &[f32], rows: usize) -> Vec<f32> {
        let (h, len) = (self.halo, self.len);
        let mut out = vec![0.0; rows * self.ext_len];
        for (r, row) in local.chunks(len).enumerate() {
            out[r * self.ext_len + h..r * self.ext_len + h + len].copy_from_slice(row);
        }
        out
    }

    /// The slab's columns of a `rows × ext_len` extended array.
    pub fn interior(&self, ext: &[f32], rows: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(rows * self.len);
        for row in ext.chunks(self.ext_len).take(rows) {
            out.extend_from_slice(&row[self.halo..self.halo + self.len]);
        }
        out
    }

    /// The observations of the extended segment from the slab's (`local` operator, values
    /// `y`): spread over the slab's components, extended, and picked at the observed ones.
    pub fn extend_observations(
        &self,
        shard: &Shard,
        local: &Observe,
        y: &[f32],
    ) -> Result<Vec<f32>> {
        let mut dense = vec![0.0f32; self.len];
        for (q, &v) in y.iter().enumerate() {
            dense[local.component(q)] = v;
        }
        let ext = self.extend(shard, &dense, 1)?;
        Ok((0..self.m).map(|q| ext[self.op.component(q)]).collect())
    }
}

/// The conditions of the module for a ring of `d` components over `ranks` ranks observed
/// through `op`, with localization radius `radius`.
pub fn check(d: usize, ranks: usize, op: &Observe, radius: f64) -> Result<()> {
    let halo = halo_width(radius);
    let shortest = d / ranks.max(1);
    let longest = d.div_ceil(ranks.max(1));
    if halo > shortest || longest + 2 * halo > d {
        let most = (d / (2 * halo).max(1)).max(1);
        return Err(refuse(
            ranks,
            format!(
                "covariance guidance with filter.loc_radius = {radius} reads {halo} halo \
                 components on each side of a slab, and the slabs of d = {d} over {ranks} ranks \
                 hold {shortest}"
            ),
            format!("use at most {most} ranks, a smaller filter.loc_radius, or a larger model.d"),
        ));
    }
    if !d.is_multiple_of(op.every) || op.offset >= op.every {
        return Err(refuse(
            ranks,
            format!(
                "covariance guidance over ranks needs observations that repeat around the ring, \
                 and observe.every = {} with observe.offset = {} on d = {d} does not",
                op.every, op.offset
            ),
            "use an observe.every that divides model.d and an observe.offset below it, or run \
             in one process",
        ));
    }
    Ok(())
}

/// The device buffers of the extended segment, kept from analysis to analysis.
pub struct HaloBuffers<B: Backend> {
    /// The plan they were made for.
    pub plan: HaloPlan,
    /// Extended forecast (`n × ext_len`), once per analysis.
    pub forecast: B::Buffer,
    /// Extended observations (`1 × m`), once per analysis.
    pub y: B::Buffer,
    /// Extended predicted endpoints, per stage.
    pub endpoint: B::Buffer,
    /// Padded state, per stage.
    pub state: B::Buffer,
    /// Padded velocity, per stage.
    pub velocity: B::Buffer,
}

impl<B: Backend> HaloBuffers<B> {
    /// `old` when made for the same plan and ensemble size, else new buffers.
    pub fn prepare(backend: &B, plan: HaloPlan, n: usize, old: Option<Self>) -> Result<Self> {
        if let Some(o) = old.filter(|o| o.plan == plan && o.forecast.rows() == n) {
            return Ok(o);
        }
        Ok(HaloBuffers {
            plan,
            forecast: backend.zeros(n, plan.ext_len)?,
            y: backend.zeros(1, plan.m)?,
            endpoint: backend.zeros(n, plan.ext_len)?,
            state: backend.zeros(n, plan.ext_len)?,
            velocity: backend.zeros(n, plan.ext_len)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::Pointwise;

    #[test]
    fn the_extended_operator_continues_the_slab_pattern() {
        // d = 60, every 2nd component from 1, over 3 ranks.
        let op = Observe::full(Pointwise::Arctan).subsample(2, 1).unwrap();
        let d = 60;
        for rank in 0..3 {
            let slab = Slab::of(d, rank, 3);
            let (local, range) = super::super::local_observe(&op, &slab, 3).unwrap();
            let plan = HaloPlan::new(&slab, 3, &local, 1.5).unwrap();
            assert_eq!(plan.halo, 6);
            // Every extended observation sits on a globally observed component.
            for q in 0..plan.m {
                let g = (slab.start + d - plan.halo + plan.op.component(q)) % d;
                assert_eq!(g % 2, 1, "rank {rank}, q {q}");
            }
            // The slab's own observations are a contiguous run of the extended ones.
            let own: Vec<usize> = (0..plan.m)
                .map(|q| plan.op.component(q))
                .filter(|&c| c >= plan.halo && c < plan.halo + slab.len)
                .collect();
            assert_eq!(own.len(), range.len());
        }
    }

    #[test]
    fn halos_that_do_not_fit_are_refused_with_the_fix() {
        let op = Observe::full(Pointwise::Identity);
        // Radius 4 reaches 15 components: 41 over 3 ranks (13 each) is too narrow.
        let e = check(41, 3, &op, 4.0).unwrap_err().to_string();
        assert!(e.contains("loc_radius") && e.contains("at most"), "{e}");
        assert!(check(41, 3, &op, 2.0).is_ok());
        // Observations that do not repeat around the ring.
        let odd = op.subsample(2, 0).unwrap();
        let e = check(41, 2, &odd, 1.0).unwrap_err().to_string();
        assert!(e.contains("observe.every"), "{e}");
        assert!(check(40, 2, &odd, 1.0).is_ok());
        // A hand-made slab narrower than the halo.
        let narrow = Slab {
            start: 0,
            len: 3,
            d: 60,
        };
        let e = HaloPlan::new(&narrow, 3, &op, 1.5).unwrap_err().to_string();
        assert!(e.contains("too narrow"), "{e}");
    }

    #[test]
    fn pad_and_interior_round_trip() {
        let slab = Slab::of(30, 1, 2);
        let op = Observe::full(Pointwise::Identity);
        let plan = HaloPlan::new(&slab, 2, &op, 1.0).unwrap();
        let x: Vec<f32> = (0..3 * slab.len).map(|v| v as f32).collect();
        let p = plan.pad(&x, 3);
        assert_eq!(p.len(), 3 * plan.ext_len);
        assert_eq!(plan.interior(&p, 3), x);
    }
}
